-- Lua variant of the meshvm filter, outbound direction (the comparison point).
-- Adds Istio's peer-metadata headers with the node's own metadata. Lua cannot
-- read node.metadata, so bench/filter/run.sh precomputes the values
-- (deterministically serialized google.protobuf.Struct of NAME, NAMESPACE,
-- WORKLOAD_NAME, CLUSTER_ID, OWNER, LABELS from the same bootstrap, base64)
-- and renders them in here; per request this is two header writes.
local PEER_METADATA = "${PEER_METADATA}"
local PEER_METADATA_ID = "${PEER_METADATA_ID}"

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:replace("x-envoy-peer-metadata", PEER_METADATA)
  headers:replace("x-envoy-peer-metadata-id", PEER_METADATA_ID)
end
