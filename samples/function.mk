# Shared recipe of the sample functions' Makefiles (template.yaml: Metadata BuildMethod:
# makefile). `sam build` runs `make --makefile samples/<sample>/Makefile build-<LogicalId>`
# from a scratch copy of the sample folder with ARTIFACTS_DIR set; everything below is
# located from the Makefile's own path, so the scratch copy does not matter.
#
# What one function folder gets:
#   1. lambda-pool from THIS checkout, built into a wheel first: a wheel can be installed
#      for the Lambda platform with --only-binary (a source tree cannot), and nothing is
#      ever looked up by the name lambda-pool on a package index (an unclaimed name there
#      is a dependency-confusion risk);
#   2. the extras the function needs (binary wheels for Lambda's platform, Python
#      version and architecture, whatever the build machine is);
#   3. app.py;
#   4. hash-checked bytecode for all of it: SAM's zip dates every entry 1980-01-01, so
#      timestamp .pyc files never validate on Lambda, and /var/task is read-only, so
#      Python cannot cache new ones: without this every cold start compiles everything.

# Must match template.yaml (Globals.Function.Runtime): the .pyc files are for one version.
LAMBDA_PYTHON ?= 3.12
# x86_64 or arm64, as template.yaml's Architecture parameter (SAM does not pass it to make).
LAMBDA_ARCHITECTURE ?= x86_64
# Not PYTHON: the repository Makefile takes PYTHON=... on its command line, and make
# passes command-line variables on to every make below it (MAKEFLAGS), sam build's too.
LAMBDA_BUILD_PYTHON ?= python$(LAMBDA_PYTHON)

SAMPLE_DIR := $(abspath $(dir $(firstword $(MAKEFILE_LIST))))
REPO := $(abspath $(SAMPLE_DIR)/../..)
PLATFORM_ARCH := $(if $(filter arm64,$(LAMBDA_ARCHITECTURE)),aarch64,x86_64)

# $(call build_function,EXTRAS): EXTRAS is the comma-separated list of lambda-pool extras,
# empty for none.
define build_function
	@test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set: run this through 'sam build'" >&2; exit 2; }
	@$(LAMBDA_BUILD_PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(LAMBDA_PYTHON)" else "$(LAMBDA_BUILD_PYTHON) is Python " + v + ", the functions run $(LAMBDA_PYTHON): set LAMBDA_BUILD_PYTHON=python$(LAMBDA_PYTHON)")' \
	  || { echo "sam build needs Python $(LAMBDA_PYTHON) (the functions' runtime) as $(LAMBDA_BUILD_PYTHON) on PATH" >&2; exit 2; }
	@echo "lambda-pool: $@ -> $(ARTIFACTS_DIR): lambda-pool[$(1)] from $(REPO), Python $(LAMBDA_PYTHON) $(LAMBDA_ARCHITECTURE)"
	@set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	mkdir -p "$$work/src"; \
	cp "$(REPO)/pyproject.toml" "$(REPO)/README.md" "$$work/src/"; \
	cp -R -L "$(REPO)/lambda_pool" "$$work/src/lambda_pool"; \
	find "$$work/src" -name __pycache__ -prune -exec rm -rf {} +; \
	$(LAMBDA_BUILD_PYTHON) -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$$work/dist" "$$work/src"; \
	wheel=$$(ls "$$work"/dist/lambda_pool-*.whl); \
	$(LAMBDA_BUILD_PYTHON) -m pip install --quiet --disable-pip-version-check --no-compile --root-user-action=ignore \
	  --target "$(ARTIFACTS_DIR)" --upgrade \
	  --implementation cp --python-version $(LAMBDA_PYTHON) --only-binary=:all: \
	  --platform manylinux2014_$(PLATFORM_ARCH) --platform manylinux_2_28_$(PLATFORM_ARCH) \
	  "$$wheel$(if $(1),[$(1)])"
	@cp "$(SAMPLE_DIR)/app.py" "$(ARTIFACTS_DIR)/app.py"
	@rm -rf "$(ARTIFACTS_DIR)/bin"
	@echo "lambda-pool: $@: hash-checked bytecode (compileall --invalidation-mode checked-hash)"
	@$(LAMBDA_BUILD_PYTHON) -m compileall -q -f -j 0 --invalidation-mode checked-hash "$(ARTIFACTS_DIR)" >/dev/null
endef
