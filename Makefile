# imgcache developer commands. `make help` lists them.
# Everything runs against a local control plane on 127.0.0.1; nothing needs a cloud account.

SHELL := /bin/bash
UV_VERSION := 0.13.8
# `python3 -m uv` works right after the pip install below, before any shell rehash.
UV := python3 -m uv
PYTEST_ARGS ?=
KUBECTL := .cluster/bin/kubectl --kubeconfig .cluster/kubeconfig

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Install uv, the locked Python dependencies and the system packages the tests use
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen
	@bash tests/install-system-packages.sh

.PHONY: binaries
binaries: ## Build the pinned etcd, Kubernetes and kwok binaries into .cluster/bin (cached)
	bash tests/controlplane/build.sh

.PHONY: cluster-up
cluster-up: tools binaries ## Start the local control plane; kubeconfig at .cluster/kubeconfig
	cd tests && $(UV) run python -m testbed up

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and every process it started
	cd tests && $(UV) run python -m testbed down

.PHONY: test
test: tools binaries ## Run every test: unit, cluster and fault tolerance (what CI runs)
	$(UV) run pytest $(PYTEST_ARGS)

.PHONY: lint
lint: tools ## ruff, mypy --strict and import-linter
	$(UV) run ruff check imgcache tests benchmarks
	$(UV) run mypy
	$(UV) run lint-imports

.PHONY: demo
demo: tools binaries ## Run imgcache on a local cluster with fake nodes; KEEP=1 keeps the cluster
	cd tests && $(UV) run python -m testbed.demo $(if $(KEEP),--keep,)

.PHONY: bench
bench: tools binaries ## Run the benchmark suite and rewrite docs/benchmarks.md (about 30 min)
	$(UV) run python -m benchmarks

.PHONY: bench-quick
bench-quick: tools binaries ## A smaller benchmark run (a few minutes)
	$(UV) run python -m benchmarks --quick

.PHONY: manifests
manifests: binaries ## Render the kustomize base and overlays into dist/manifests
	@mkdir -p dist/manifests
	.cluster/bin/kubectl kustomize manifests > dist/manifests/imgcache.yaml
	.cluster/bin/kubectl kustomize manifests/overlays/aws > dist/manifests/imgcache-aws.yaml
	.cluster/bin/kubectl kustomize manifests/overlays/monitoring > dist/manifests/imgcache-monitoring.yaml
	@echo "rendered into dist/manifests/"

.PHONY: image
image: ## Build the controller and helper images (needs a Docker engine with buildx)
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make image needs a running Docker engine; none was found" >&2; exit 1; }
	docker buildx build --platform linux/amd64,linux/arm64 -t imgcache:dev .
	docker buildx build --platform linux/amd64,linux/arm64 --target helper -t imgcache-helper:dev .

.PHONY: clean
clean: ## Stop any local cluster and remove build output (keeps the Go binaries)
	-cd tests && $(UV) run python -m testbed down 2>/dev/null
	-cd tests && $(UV) run python -m testbed.demo --stop 2>/dev/null
	rm -rf .cluster/local .cluster/test-* .cluster/demo dist .pytest_cache .mypy_cache .ruff_cache
