# Every target sets up what it needs: a fresh clone with Python 3.11 runs `make plan STACK=dev` or `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STACK ?= dev
PROJECT_NAME := nemo-eks
PUSH ?= 0

.PHONY: help venv plan plan-all test bench sizing docs image clean clean-all

help:
	@echo "make plan STACK=<name>   offline plan of stacks/Pulumi.<name>.yaml into build/<name>/"
	@echo "make plan-all            offline plan of every stack file"
	@echo "make test                unit, mock, schema, moto and NeMo-environment tests (what CI runs)"
	@echo "make sizing              the sizing matrix: every variant x method x GPU type (Markdown)"
	@echo "make docs                rewrite the generated tables of docs/ (config keys, sizing)"
	@echo "make bench               time the planner over the full matrix"
	@echo "make image [PUSH=1 STACK=<name>]  build the EFA training image (docker); PUSH=1 pushes it to the stack's ECR"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# checkov pins its own dependency versions (older `packaging`, among others), so it gets a virtualenv of
# its own instead of breaking the program's.
TOOLS_VENV := .venv-tools
$(TOOLS_VENV)/.installed: requirements-tools.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet -r requirements-tools.txt
	touch $@

plan: venv
	$(PY) -m tools.synth $(STACK)

plan-all: venv
	@for stack in $$(ls stacks | sed -n 's/^Pulumi\.\(.*\)\.yaml$$/\1/p'); do \
		$(PY) -m tools.synth $$stack || exit 1; done

# The policy pack's pulumi-policy pins protobuf 5, which the program's test dependencies (tritonclient)
# cannot share: its tests get a virtualenv of their own too.
POLICY_VENV := .venv-policy
$(POLICY_VENV)/.installed: requirements.txt policy/requirements.txt policy/requirements-test.txt
	test -x $(POLICY_VENV)/bin/python || $(PYTHON) -m venv $(POLICY_VENV)
	$(POLICY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(POLICY_VENV)/bin/python -m pip install --quiet -r policy/requirements-test.txt
	touch $@

test: venv $(TOOLS_VENV)/.installed $(POLICY_VENV)/.installed
	$(PY) -m pytest
	$(POLICY_VENV)/bin/python -m pytest -c pyproject.toml policy/tests
	bash tests/nemo/run.sh

sizing: venv
	@$(PY) -m infra.sizing --matrix

docs: venv
	$(PY) -m tools.docgen --write

bench: venv
	$(PY) -m tools.bench

# The EFA training image of multi-node stacks (images/training/Dockerfile, docs/efa.md), built as
# .github/workflows/training-image.yml builds it: the pins come from infra/images.py TRAINING_IMAGES. Needs docker
# and about 80 GB of free disk (the NeMo base image is tens of GB). PUSH=1 also pushes it to the ECR repository
# that `pulumi up` declared for STACK (AWS credentials of that account); an existing tag is never overwritten.
IMAGE_BASE_TAG ?= 26.02
image: venv
	@set -eu; \
	tag=$$($(PY) -m tools.training_image tag --base-tag $(IMAGE_BASE_TAG)); \
	repository=$(PROJECT_NAME)-$(STACK)-training; \
	docker build $$($(PY) -m tools.training_image build-args --base-tag $(IMAGE_BASE_TAG)) \
		--tag "$$repository:$$tag" images/training; \
	echo "built $$repository:$$tag"; \
	if [ "$(PUSH)" = "1" ]; then \
		url=$$(aws ecr describe-repositories --repository-names "$$repository" \
			--query 'repositories[0].repositoryUri' --output text); \
		aws ecr get-login-password | docker login --username AWS --password-stdin "$${url%%/*}"; \
		docker tag "$$repository:$$tag" "$$url:$$tag"; \
		docker push "$$url:$$tag"; \
	fi

clean:
	rm -rf build .pytest_cache

clean-all: clean
	rm -rf $(VENV) $(TOOLS_VENV) $(POLICY_VENV) .venv-nemo
