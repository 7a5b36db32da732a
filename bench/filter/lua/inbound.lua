-- Lua variant of the meshvm filter, inbound direction (the comparison point).
-- Per request it does the same header work as the Wasm filter:
--  1. removes every incoming x-mesh-peer-* header (iterate, collect, remove);
--  2. if the downstream connection is TLS and the peer presented a certificate,
--     takes its first URI SAN (uriSanPeerCertificate()), parses
--     spiffe://<td>/ns/<ns>/sa/<sa> and sets x-mesh-peer-identity,
--     x-mesh-peer-namespace, x-mesh-peer-service-account;
--  3. only for a peer with such a SPIFFE ID, if x-envoy-peer-metadata is
--     present: base64-decodes it, walks the serialized google.protobuf.Struct
--     (pure-Lua protobuf reader), ignores it if its NAMESPACE differs from the
--     certificate's, else sets x-mesh-peer-workload (WORKLOAD_NAME), -app
--     (LABELS app, else app.kubernetes.io/name, else
--     service.istio.io/canonical-name), -version (LABELS version, else
--     app.kubernetes.io/version, else service.istio.io/canonical-revision) and
--     -cluster (CLUSTER_ID) -- the same rules as the Wasm filter;
--  4. removes x-envoy-peer-metadata and x-envoy-peer-metadata-id.
-- Not done (the Wasm filter does them): a size limit on the metadata header,
-- rejecting values with control characters, metrics.
local byte, sub, char, floor, concat = string.byte, string.sub, string.char, math.floor, table.concat

local PREFIX = "x-mesh-peer-"
local PREFIX_LEN = #PREFIX

local B64 = {}
do
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  for i = 1, 64 do B64[byte(alphabet, i)] = i - 1 end
end

-- Standard base64, padding optional. Returns nil on malformed input.
local function b64decode(s)
  local len = #s
  while len > 0 and byte(s, len) == 61 do len = len - 1 end -- strip '='
  local out, n, i = {}, 0, 1
  while i + 3 <= len do
    local a, b, c, d = B64[byte(s, i)], B64[byte(s, i + 1)], B64[byte(s, i + 2)], B64[byte(s, i + 3)]
    if not (a and b and c and d) then return nil end
    local v = ((a * 64 + b) * 64 + c) * 64 + d
    n = n + 1
    out[n] = char(floor(v / 65536), floor(v / 256) % 256, v % 256)
    i = i + 4
  end
  local rest = len - i + 1
  if rest == 2 or rest == 3 then
    local a, b = B64[byte(s, i)], B64[byte(s, i + 1)]
    if not (a and b) then return nil end
    if rest == 2 then
      n = n + 1
      out[n] = char(floor((a * 64 + b) / 16))
    else
      local c = B64[byte(s, i + 2)]
      if not c then return nil end
      local v = (a * 64 + b) * 64 + c
      n = n + 1
      out[n] = char(floor(v / 1024), floor(v / 4) % 256)
    end
  elseif rest == 1 then
    return nil
  end
  return concat(out)
end

-- Protobuf wire format ------------------------------------------------------
local function varint(s, i)
  local n, mul = 0, 1
  while true do
    local c = byte(s, i)
    if not c then return nil end
    i = i + 1
    n = n + (c % 128) * mul
    if c < 128 then return n, i end
    mul = mul * 128
  end
end

-- Skip a field of wire type wt starting at i; returns the next index.
local function skip(s, i, wt)
  if wt == 0 then
    local _, j = varint(s, i)
    return j
  elseif wt == 1 then
    return i + 8
  elseif wt == 2 then
    local l, j = varint(s, i)
    return l and j + l
  elseif wt == 5 then
    return i + 4
  end
  return nil
end

local decode_struct

-- google.protobuf.Value in s[i, j): string_value (3) -> string,
-- struct_value (5) -> table; other kinds -> nil.
local function decode_value(s, i, j)
  local v
  while i and i < j do
    local tag
    tag, i = varint(s, i)
    if not tag then return nil end
    if tag == 26 or tag == 42 then -- 3:LEN string, 5:LEN struct
      local l
      l, i = varint(s, i)
      if not l then return nil end
      if tag == 26 then v = sub(s, i, i + l - 1) else v = decode_struct(s, i, i + l) end
      i = i + l
    else
      i = skip(s, i, tag % 8)
    end
  end
  return v
end

-- google.protobuf.Struct in s[i, j) -> table (key -> string | table).
decode_struct = function(s, i, j)
  local out = {}
  while i and i < j do
    local tag
    tag, i = varint(s, i)
    if not tag then return nil end
    if tag == 10 then -- 1:LEN map entry {1: key, 2: Value}
      local l
      l, i = varint(s, i)
      if not l then return nil end
      local e, stop = i, i + l
      i = stop
      local k, v
      while e and e < stop do
        local t, len
        t, e = varint(s, e)
        if not t then return nil end
        if t == 10 or t == 18 then
          len, e = varint(s, e)
          if not len then return nil end
          if t == 10 then k = sub(s, e, e + len - 1) else v = decode_value(s, e, e + len) end
          e = e + len
        else
          e = skip(s, e, t % 8)
        end
      end
      if k ~= nil and v ~= nil then out[k] = v end
    else
      i = skip(s, i, tag % 8)
    end
  end
  return out
end

-- Filter ---------------------------------------------------------------------
function envoy_on_request(handle)
  local headers = handle:headers()

  -- 1. Drop identity headers that came from outside (cannot remove while iterating).
  local drop, nd = nil, 0
  for name, _ in pairs(headers) do
    if sub(name, 1, PREFIX_LEN) == PREFIX then
      nd = nd + 1
      if drop == nil then drop = {} end
      drop[nd] = name
    end
  end
  for k = 1, nd do headers:remove(drop[k]) end

  local md = headers:get("x-envoy-peer-metadata")
  local md_id = headers:get("x-envoy-peer-metadata-id")

  -- 2. mTLS peer identity.
  local ssl = handle:streamInfo():downstreamSslConnection()
  if ssl ~= nil and ssl:peerCertificatePresented() then
    local sans = ssl:uriSanPeerCertificate()
    local uri = sans and sans[1]
    local ns, sa
    if uri then
      ns, sa = uri:match("^spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)$")
      if ns then
        headers:add("x-mesh-peer-identity", uri)
        headers:add("x-mesh-peer-namespace", ns)
        headers:add("x-mesh-peer-service-account", sa)
      end
    end

    -- 3. Istio peer metadata, trusted only from an authenticated peer.
    if ns and md ~= nil then
      local raw = b64decode(md)
      local meta = raw and decode_struct(raw, 1, #raw + 1)
      if meta and (type(meta.NAMESPACE) ~= "string" or meta.NAMESPACE == "" or meta.NAMESPACE == ns) then
        local labels = meta.LABELS
        if type(labels) ~= "table" then labels = {} end
        local function str(v) if type(v) == "string" and v ~= "" then return v end end
        local workload = str(meta.WORKLOAD_NAME)
        local app = str(labels.app) or str(labels["app.kubernetes.io/name"]) or str(labels["service.istio.io/canonical-name"])
        local version = str(labels.version) or str(labels["app.kubernetes.io/version"]) or str(labels["service.istio.io/canonical-revision"])
        local cluster = str(meta.CLUSTER_ID)
        if workload then headers:add("x-mesh-peer-workload", workload) end
        if app then headers:add("x-mesh-peer-app", app) end
        if version then headers:add("x-mesh-peer-version", version) end
        if cluster then headers:add("x-mesh-peer-cluster", cluster) end
      end
    end
  end

  -- 4. Istio's headers do not go to the app.
  if md ~= nil then headers:remove("x-envoy-peer-metadata") end
  if md_id ~= nil then headers:remove("x-envoy-peer-metadata-id") end
end
