# clusterapp — the two commands a newcomer needs: `make demo` and `make test`.
# Everything else here is a step of those two.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
export CLUSTERAPP_CACHE ?= $(HOME)/.cache/clusterapp

.PHONY: help deps tools build cluster cluster-down test demo bench deploy fuzz \
        nodes-deps nodes-tools images nodes-check

help:
	@echo "make demo          run the operator on a local cluster with a sample ClusterApp"
	@echo "make test          install what is missing, then run every test"
	@echo "make bench         benchmarks (balancer vs Apache httpd, operator at scale)"
	@echo "make fuzz          the balancer's cargo-fuzz targets, FUZZ_SECONDS (60) each"
	@echo "make cluster       control plane + 3 real nodes (containerd, kubelet), kube-proxy, CoreDNS,"
	@echo "                   our images in the local registry (last line: KUBECONFIG=...)"
	@echo "make cluster-down  stop it all and check that nothing is left"
	@echo "make images        build our images with buildah into the local registry (cached)"
	@echo "make nodes-check   check the real nodes (Pods, exec/logs, Services, DNS)"

# Debian packages (tomcat10, apache2, wrk, chromium, ...), installed when missing.
deps:
	@bash tests/bed/apt-deps.sh

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and
# helm, built from their Go modules once per machine into $(CLUSTERAPP_CACHE).
tools: deps
	@bash tests/bed/install.sh >/dev/null

build:
	$(CARGO) build --locked

# deploy/clusterapp.yaml from the chart (a test fails when it is stale).
deploy: tools
	@bash tests/bed/gen-deploy.sh

# The local cluster: tests/bed/nodes/README.md says what runs where.
cluster: images
	@bash tests/bed/nodes/nodes.sh up

cluster-down:
	@bash tests/bed/nodes/nodes.sh down

test: nodes-tools
	@bash tests/bed/run-tests.sh

demo: nodes-tools
	@bash tests/bed/demo.sh

# The balancer against Apache httpd, then the operator at N = 1, 100, 300
# ClusterApps; each prints its ratio / summary lines last.
bench: tools
	$(CARGO) bench --bench balancer
	bash tests/bench/operator/run.sh 1 100 300

# cargo-fuzz targets for the balancer's parsers (AJP decoder, route parser,
# request-framing scanner); installs nightly and cargo-fuzz when missing.
FUZZ_SECONDS ?= 60
fuzz:
	bash tests/bed/fuzz.sh $(FUZZ_SECONDS)

# Debian packages of the nodes: containerd, runc, CNI plugins, nftables,
# buildah, mmdebstrap, musl-tools.
nodes-deps:
	@bash tests/bed/nodes/apt-deps.sh

# tools + CoreDNS, the distribution registry and crictl from their Go modules.
nodes-tools: deps nodes-deps
	@bash tests/bed/install.sh --nodes >/dev/null

images: nodes-tools
	@bash tests/bed/nodes/images.sh

# starts the nodes when they do not run yet (and leaves them running)
nodes-check: nodes-tools
	@bash tests/bed/nodes/check.sh --up
