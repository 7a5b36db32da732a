# meshvm — build, test, demo and benchmark entry points.
#
# CARGO_TARGET_DIR is honoured, so one target directory can be shared
# between checkouts (wasmtime is slow to build).

CARGO      ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
WASM_RAW   := $(TARGET_DIR)/wasm32-wasip1/wasm/meshvm_filter.wasm
# The shipped filter: the release build, further shrunk by binaryen's wasm-opt.
WASM       := $(TARGET_DIR)/meshvm/meshvm_filter.wasm
# OCI image layouts of the shipped filter (`make oci`).
OCI_DIR    := $(TARGET_DIR)/meshvm/oci
# A guard against size regressions (the filter, the health service and their
# JSON configuration; no heavy dependencies), not a target.
WASM_MAX_BYTES := 225280
# Features rustc enables by default for wasm32; wasm-opt must keep to them.
WASM_OPT_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
                     --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types

export MESHVM_FILTER_WASM := $(WASM)

.PHONY: all build wasm oci deb test test-native test-wasm-unit lint demo demo-filter bench-filter bench-identity bench-join bench-dns bench-mesh bench-wasm clean

all: build

build: wasm
	$(CARGO) build --workspace

## wasm: build meshvm_filter.wasm (wasm32-wasip1, release, size-optimised)
wasm:
	$(CARGO) build -p meshvm-filter --target wasm32-wasip1 --profile wasm
	@mkdir -p $(dir $(WASM))
	wasm-opt -Oz --strip-debug --strip-producers $(WASM_OPT_FEATURES) $(WASM_RAW) -o $(WASM).tmp
	@mv $(WASM).tmp $(WASM)
	@size=$$(stat -c %s $(WASM)); echo "meshvm_filter.wasm: $$size bytes ($(WASM))"; \
	  if [ $$size -gt $(WASM_MAX_BYTES) ]; then echo "filter is larger than $(WASM_MAX_BYTES) bytes" >&2; exit 1; fi

## oci: the filter as OCI images for Istio's WasmPlugin, "compat" and "oci" variants
## (layouts and tarballs in $(TARGET_DIR)/meshvm/oci; reproducible; no container engine).
oci: wasm
	python3 scripts/oci_image.py $(WASM) $(OCI_DIR)

## deb: the Debian package meshvm-agent_<version>_<arch>.deb (release agent, the
## filter, a systemd unit; Envoy not included) in $(TARGET_DIR)/meshvm/deb/.
deb: wasm
	$(CARGO) build --release -p meshvm-agent
	scripts/build-deb.sh $(TARGET_DIR)/release/meshvm-agent $(WASM) $(TARGET_DIR)/meshvm/deb

## test: every test — native unit and integration tests (harness, real Envoy), and the
## filter's pure logic compiled to wasm32-unknown-unknown under Node.
test: wasm test-native test-wasm-unit

test-native:
	$(CARGO) test --workspace

test-wasm-unit:
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  $(CARGO) test -p meshvm-filter --lib --target wasm32-unknown-unknown

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p meshvm-filter --target wasm32-wasip1 -- -D warnings

## demo: a control plane, a Pod and a VM (agent, Envoy, app) on this host: the VM
## registers, resolves and calls the product Service (balanced over the Pod and
## itself, mTLS, identities), then leaves.
demo: wasm
	$(CARGO) build -p meshvm-controlplane -p meshvm-agent
	MESHVM_BIN_DIR=$(TARGET_DIR)/debug scripts/demo.sh

## demo-filter: only the filter: two static Envoys, a request before and after labeling.
demo-filter: wasm
	$(CARGO) build -p meshvm-controlplane
	MESHVM_BIN_DIR=$(TARGET_DIR)/debug scripts/demo-filter.sh

## bench-filter: Envoy with no filter, a no-op Wasm module, the meshvm filter and an
## equivalent Lua filter (~6 min; knobs: DURATION CONNECTIONS RUNS VARIANTS; writes
## bench/results/filter.md).
bench-filter: wasm
	bench/filter/run.sh

## bench-identity: time from agent start to a certificate served over SDS (ECDSA
## P-256 and RSA 2048, against the local control plane's CA), next to a restart
## onto a stored certificate and openssl key generation; agent memory
## (bench/results/identity.md).
bench-identity:
	bench/identity/run.sh

## bench-join: time from agent start (with Envoy) to its WorkloadEntry existing, next
## to its certificate being served and a restart within the grace period; the
## control plane's memory and CPU with 1,000 simulated VMs registered over TLS
## (~3 min; knobs: VMS CONCURRENCY RUNS HOLD; needs hyperfine, envoy, python3;
## bench/results/join.md).
bench-join:
	bench/join/run.sh

## bench-dns: the agent's DNS proxy vs dnsmasq serving the same 10,000 names
## (dnsperf: queries/s and latency percentiles), and memory with 10k and 100k
## names (~2 min; knobs: N SECONDS_PER_RUN CLIENTS RATE; needs dnsperf, dnsmasq, dig;
## bench/results/dns.md).
bench-dns:
	bench/dns/run.sh

## bench-mesh: VM -> Service requests through both Envoys over mTLS with the meshvm
## filter on both sides vs plain Envoy-to-Envoy mTLS, side by side (wrk: requests/s,
## p50/p90/p99), and agent start to first successful request (~3 min; knobs:
## DURATION RUNS CONNECTIONS JOIN_RUNS; needs wrk, envoy, curl; bench/results/mesh.md).
bench-mesh: wasm
	bench/mesh/run.sh

## bench-wasm: the filter's image (compat and oci) from a local registry into the
## agent's cache, and from the cache, vs skopeo copy of the same image (hyperfine;
## writes bench/results/wasm.md).
bench-wasm: wasm
	bench/wasm/run.sh

clean:
	$(CARGO) clean
