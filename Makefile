# Interlink: every target bootstraps .venv from nothing (Python 3.11+, a C compiler, the package index).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.interlink-installed
PYTEST_ARGS ?=

.PHONY: all demo web-demo test test-pure bench bench-baseline stress cluster-stress annotate check-install clean load fuzz ws-probe proxy-check

all: $(STAMP)

# Create the venv, install the package editable with its test extras; this compiles ext/*.pyx.
$(STAMP): pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.pxd ext/*.pxi)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -c "import interlink.core as c; assert c.IMPLEMENTATION == 'cython', c.IMPLEMENTATION; print('interlink built:', c.IMPLEMENTATION)"
	@touch $@

demo: $(STAMP)
	$(BIN)/python -m interlink.demo

# The chat page over WebSocket (bindings/web/): open the URL it prints; WEB_DEMO_ARGS='--port 0' for any free port.
WEB_DEMO_ARGS ?=
web-demo: $(STAMP)
	$(BIN)/python -m interlink.webdemo $(WEB_DEMO_ARGS)

# The whole suite against the compiled build (a missing extension is an error, not a fall-back),
# then what the twins serve again on the pure-Python twins: the connection and Noise tests, the
# fan-out and dispatch tests, the LMDB store and the end-to-end gateway and group tests. (The
# twins' own unit tests run both implementations side by side in the first pass.)
PURE_AGAIN := tests/protocol/test_connection.py tests/protocol/test_noise.py tests/protocol/test_noise_vectors.py tests/domain/test_fanout.py tests/domain/test_dispatch.py tests/domain/test_relay.py tests/edge/lmdbstore tests/e2e/test_gateway.py tests/e2e/test_groups.py tests/e2e/test_admission.py
test: $(STAMP)
	INTERLINK_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	INTERLINK_PURE=1 $(BIN)/python -m pytest -q $(PURE_AGAIN)

# The same suite with the pure-Python twins forced everywhere.
test-pure: $(STAMP)
	INTERLINK_PURE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Micro benchmarks (pytest-benchmark, bench/bench_*.py; docs/benchmarks.md, "Micro benchmarks").
# make bench saves every run under .benchmarks/<machine id>/ and compares it with the latest
# baseline saved by make bench-baseline (a run named BENCH_NAME), or else with the latest saved
# run, if any; BENCH_COMPARE names another (a saved file, or a run number: 0003).
# BENCH_COMPARE_FAIL gates: BENCH_COMPARE_FAIL=mean:10% (several: 'mean:10% min:5%'; integer
# percentages or seconds) fails the run on a regression, and fails when there is nothing to compare.
# Runs take BENCH_MAX_TIME seconds per benchmark at most (some use fixed rounds): about 2 minutes.
BENCH_MAX_TIME ?= 0.5
BENCH_COMPARE ?=
BENCH_COMPARE_FAIL ?=
BENCH_NAME ?= baseline
BENCH_RUN = INTERLINK_REQUIRE_NATIVE=1 $(BIN)/python -m pytest bench -q -p no:cacheprovider --benchmark-only \
	--benchmark-min-rounds=5 --benchmark-max-time=$(BENCH_MAX_TIME)
bench_dir = .benchmarks/$(shell $(BIN)/python -c 'from pytest_benchmark.utils import get_machine_id; print(get_machine_id())')
bench_against = $(or $(BENCH_COMPARE),$(lastword $(sort $(wildcard $(bench_dir)/*_$(BENCH_NAME).json))),$(lastword $(sort $(wildcard $(bench_dir)/*.json))))
bench: $(STAMP)
	$(BENCH_RUN) --benchmark-autosave $(PYTEST_ARGS) \
	  $(if $(bench_against),--benchmark-compare='$(bench_against)',$(if $(BENCH_COMPARE_FAIL),--benchmark-compare)) \
	  $(if $(BENCH_COMPARE_FAIL),--benchmark-compare-fail $(BENCH_COMPARE_FAIL))

bench-baseline: $(STAMP)
	$(BENCH_RUN) --benchmark-save=$(BENCH_NAME) $(PYTEST_ARGS)

# The crash test at length (tests/test_crash.py runs 5 cycles): the gateway child is SIGKILLed
# STRESS_CYCLES times under 1:1 and multi-device traffic, restarted, and finally drained; prints the
# counts as JSON and fails on any lost, duplicated or reordered message. Each cycle's phases are
# bounded, and so is the whole run. E.g. make stress STRESS_CYCLES=10 STRESS_ARGS='--resend outbox'
STRESS_CYCLES ?= 100
STRESS_ARGS ?=
stress: $(STAMP)
	INTERLINK_REQUIRE_NATIVE=1 $(BIN)/python bench/crash.py --cycles $(STRESS_CYCLES) $(STRESS_ARGS)

# The crash test of a cluster (tests/e2e/test_cluster_crash.py runs 3 cycles): three gateway nodes
# and a nats-server, each a child process, under cross-node 1:1 and group traffic (three groups,
# one homed on each node; --groups 0 for 1:1 only); each cycle SIGKILLs a
# random node (or, with CLUSTER_STRESS_ARGS='--kill nats', the NATS server) and restarts it, then
# everything is drained; prints the counts as JSON and fails on any lost, duplicated, reordered or
# unacked message. E.g. make cluster-stress CLUSTER_STRESS_CYCLES=10 CLUSTER_STRESS_ARGS='--kill nats'
CLUSTER_STRESS_CYCLES ?= 50
CLUSTER_STRESS_ARGS ?=
cluster-stress: $(STAMP)
	INTERLINK_REQUIRE_NATIVE=1 $(BIN)/python bench/cluster_crash.py --cycles $(CLUSTER_STRESS_CYCLES) $(CLUSTER_STRESS_ARGS)

# Rebuild with Cython annotations: open ext/*.html to see the yellow (Python-level) lines.
annotate: $(STAMP)
	INTERLINK_ANNOTATE=1 $(BIN)/python setup.py -q build_ext --inplace --force
	@ls ext/*.html

clean:
	rm -rf build dist *.egg-info ext/*.c ext/*.so ext/*.html .pytest_cache .benchmarks

# Synthetic traffic against a local gateway (interlink load): e.g.
# make load SCENARIO=offline-drain LOAD_ARGS='--messages 50000 --json load.json'
SCENARIO ?= chat-1to1
LOAD_ARGS ?=
load: $(STAMP)
	$(BIN)/python -m interlink.cli load $(SCENARIO) $(LOAD_ARGS)

# Coverage-guided fuzzing (atheris; fuzz/, docs/reliability.md): every fuzz/fuzz_*.py for FUZZ_SECONDS
# each, one after another; new inputs and crash artifacts go to fuzz/.work/ (gitignored). E.g.
# make fuzz FUZZ_SECONDS=60 FUZZ_ARGS='frames config'   or   FUZZ_ARGS='--runs 1000000 handshake'
FUZZ_SECONDS ?= 600
FUZZ_ARGS ?=
fuzz: $(STAMP)
	INTERLINK_REQUIRE_NATIVE=1 $(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# A random probe of the WebSocket listener over loopback (tests/e2e/test_websocket_probe.py; make
# test runs it for 2 s): random frames after an upgrade, a preamble or a real session, for
# WS_PROBE_SECONDS; fails on an internal error, an ERROR log line or a client not served after.
# E.g. make ws-probe WS_PROBE_SECONDS=600 WS_PROBE_SEED=7
WS_PROBE_SECONDS ?= 120
WS_PROBE_SEED ?= 1
ws-probe: $(STAMP)
	INTERLINK_REQUIRE_NATIVE=1 INTERLINK_WS_PROBE_S=$(WS_PROBE_SECONDS) INTERLINK_WS_PROBE_SEED=$(WS_PROBE_SEED) \
		$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/e2e/test_websocket_probe.py

# The proxy configurations of docs/operations.md run as written with the real HAProxy and nginx
# (not in make test: CI machines have neither). Debian 12: apt install haproxy nginx-light.
proxy-check: $(STAMP)
	INTERLINK_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q -p no:cacheprovider checks
