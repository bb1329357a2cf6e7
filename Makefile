# OncoFusion: `make demo` serves every bundle on the synthetic sample data; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
SAMPLE_DIR := sample_data/lung
BONE_DIR := sample_data/bone
DEMO_DIR := sample_data/demo
SAMPLE_CASES ?= 120
BONE_CASES ?= 200
THYROID_DIR := sample_data/thyroid
THYROID_CASES ?= 200
RECTAL_DIR := sample_data/rectal
RECTAL_CASES ?= 200
OPSCC_DIR := sample_data/opscc
OPSCC_CASES ?= 80

.PHONY: setup sample-data demo-weights demo demo-pacs test test-fast bench stress lint clean mutation

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[serve,dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt monailabel==0.8.5
	touch $@

sample-data: $(DEMO_DIR)/.ready

# no patient of the set the lung demo weights were trained on: every number on this set is held-out
$(SAMPLE_DIR)/manifest.json: sample_data/generate_lung.py sample_data/common.py sample_data/lung_training_patients.json | setup
	$(PY) -m sample_data.generate_lung --out $(SAMPLE_DIR) --num-cases $(SAMPLE_CASES) --seed 0 --exclude-patients-of sample_data/lung_training_patients.json

$(BONE_DIR)/manifest.json: sample_data/generate_bone.py sample_data/common.py | setup
	$(PY) -m sample_data.generate_bone --out $(BONE_DIR) --num-cases $(BONE_CASES) --seed 0

$(THYROID_DIR)/manifest.json: sample_data/generate_thyroid.py sample_data/common.py | setup
	$(PY) -m sample_data.generate_thyroid --out $(THYROID_DIR) --num-cases $(THYROID_CASES) --seed 0

$(RECTAL_DIR)/manifest.json: sample_data/generate_rectal.py sample_data/ultrasound.py sample_data/common.py | setup
	$(PY) -m sample_data.generate_rectal --out $(RECTAL_DIR) --num-cases $(RECTAL_CASES) --seed 0 --frames-per-patient 2

$(OPSCC_DIR)/manifest.json: sample_data/generate_opscc.py sample_data/slides.py sample_data/common.py | setup
	$(PY) -m sample_data.generate_opscc --out $(OPSCC_DIR) --num-cases $(OPSCC_CASES) --seed 0

# one MONAI Label datastore holding every bundle's sample studies (links, no copies)
$(DEMO_DIR)/.ready: $(SAMPLE_DIR)/manifest.json $(BONE_DIR)/manifest.json
# OPSCC: the CTs and sidecars are studies; beside them, where the sidecars' relative paths point (the bundle
# reads slides and masks under the studies folder), the slides (*.tiff: not a listed pattern, so not studies),
# their tumor outlines and the masks (label tags 'tumor' and 'node', not 'final': Next Sample still offers them)
$(DEMO_DIR)/.ready: $(OPSCC_DIR)/manifest.json
$(DEMO_DIR)/.ready: $(THYROID_DIR)/manifest.json $(RECTAL_DIR)/manifest.json
	mkdir -p $(DEMO_DIR)/sidecars
	for d in $(SAMPLE_DIR) $(BONE_DIR); do \
		ln -sf "$$(realpath $$d/datastore)"/*.nii.gz $(DEMO_DIR)/; \
		ln -sf "$$(realpath $$d/datastore/sidecars)"/*.json $(DEMO_DIR)/sidecars/; \
	done
	for d in $(THYROID_DIR) $(RECTAL_DIR); do \
		ln -sf "$$(realpath $$d/datastore)"/*.dcm $(DEMO_DIR)/; \
		ln -sf "$$(realpath $$d/datastore/sidecars)"/*.json $(DEMO_DIR)/sidecars/; \
	done
	mkdir -p $(DEMO_DIR)/annotations $(DEMO_DIR)/labels/tumor $(DEMO_DIR)/labels/node
	ln -sf "$$(realpath $(OPSCC_DIR)/datastore)"/*.nii.gz "$$(realpath $(OPSCC_DIR)/datastore)"/*_he.tiff $(DEMO_DIR)/
	ln -sf "$$(realpath $(OPSCC_DIR)/datastore/sidecars)"/*.json $(DEMO_DIR)/sidecars/
	ln -sf "$$(realpath $(OPSCC_DIR)/datastore/annotations)"/*.geojson $(DEMO_DIR)/annotations/
	for tag in tumor node; do \
		ln -sf "$$(realpath $(OPSCC_DIR)/datastore/labels/$$tag)"/*.nii.gz $(DEMO_DIR)/labels/$$tag/; \
	done
	$(PY) -m sample_data.real_ultrasound --out $(DEMO_DIR)
	touch $@

# Demo weights (committed) are trained on the synthetic sample sets when they are missing.
BONE_BUNDLE := bundles/bone_tumor_matrix
demo-weights: bundles/lung_nodule_clip/models/fold0/model.pt $(BONE_BUNDLE)/models/fold0/model.pt

# the lung weights see a larger set (800 cases; its patients are listed in sample_data/lung_training_patients.json);
# on a GPU bench/gpu_lung_train.sh does the same five folds side by side
bundles/lung_nodule_clip/models/fold0/model.pt: | setup
	$(PY) -m sample_data.generate_lung --out sample_data/lung_train --num-cases 800 --seed 0
	$(PY) -m oncofusion.cli train --bundle bundles/lung_nodule_clip --datalist-file sample_data/lung_train/manifest.json --max-epochs 20 --patience 10

# every variant of the plan (SC-Net fusion and the image-only S-Net), 5 folds each
$(BONE_BUNDLE)/models/fold0/model.pt: | $(BONE_DIR)/manifest.json
	$(PY) -m oncofusion.cli train --bundle $(BONE_BUNDLE) --datalist-file $(BONE_DIR)/manifest.json

# every variant of the plan (LLNM-Net fusion and its image-only, report-only, scalars-only ablations), 5 folds
# each, with the CPU demo recipe (configs/cpu_demo.json)
THYROID_BUNDLE := bundles/thyroid_llnm
demo-weights: $(THYROID_BUNDLE)/models/fold0/model.pt
$(THYROID_BUNDLE)/models/fold0/model.pt: | $(THYROID_DIR)/manifest.json
	$(PY) -m oncofusion.cli train --bundle $(THYROID_BUNDLE) --datalist-file $(THYROID_DIR)/manifest.json

# stage 1 (a CLIP pair pre-trained per fold, features cached) then stage 2 (the LightGBM fold boosters)
RECTAL_BUNDLE := bundles/rectal_erus_clip
demo-weights: $(RECTAL_BUNDLE)/models/booster/booster.json
$(RECTAL_BUNDLE)/models/booster/booster.json: | $(RECTAL_DIR)/manifest.json
	$(PY) -m oncofusion.cli train --bundle $(RECTAL_BUNDLE) --datalist-file $(RECTAL_DIR)/manifest.json

demo: setup sample-data demo-weights
	$(PY) -m monailabel.main start_server --app apps/oncofusion --studies $(DEMO_DIR) \
		--conf models all --host $(HOST) --port $(PORT)

# the sample studies as DICOM in a loopback Orthanc PACS, served over DICOMweb (OHIF at /ohif/);
# needs: apt-get install orthanc orthanc-dicomweb
demo-pacs: setup sample-data demo-weights
	$(PY) -m oncofusion.serving.demo_pacs --studies $(DEMO_DIR) --port $(PORT)

test: setup
	$(PY) -m pytest -q -rs tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not server" tests

bench: setup sample-data demo-weights
	$(PY) -m bench.run
	$(PY) -m bench.lidc_benchmark

# The server under attack and bad luck, against live servers: the hostile-request corpus, 32 concurrent
# inferences while /info is timed, kill -9 during saves, RSS over mixed requests (bench/results/*.json)
STRESS_KILLS ?= 30
STRESS_REQUESTS ?= 500
stress: setup sample-data demo-weights
	$(PY) -m bench.corpus
	$(PY) -m bench.load --concurrent 32
	$(PY) -m bench.kill_loop --kills $(STRESS_KILLS)
	$(PY) -m bench.memory --requests $(STRESS_REQUESTS)

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml), from scratch each time: the
# share of mutants killed per module and in total (timeouts count as killed), then the survivors; fails
# under MUTATION_MIN percent. `mutmut show NAME` prints one mutant's diff.
MUTATION_CHILDREN ?= 2
MUTATION_MIN ?= 80
mutation: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN)
	@$(VENV)/bin/mutmut results --all true | awk -v min=$(MUTATION_MIN) ' \
		{ name = $$1; sub(/:$$/, "", name); status = $$0; sub(/^[^:]*: /, "", status); \
		  module = name; sub(/\.[^.]*$$/, "", module); total[module]++; all++; \
		  if (status == "killed" || status == "timeout") { killed[module]++; dead++ } \
		  else survivors = survivors "\n  " name ": " status } \
		END { if (!all) { print "no mutants"; exit 1 } \
		      print "survivors:" survivors "\n\nkilled / total"; \
		      for (m in total) printf "  %-34s %5d / %5d  %5.1f %%\n", m, killed[m], total[m], \
		          100 * killed[m] / total[m] | "sort"; \
		      close("sort"); \
		      printf "  %-34s %5d / %5d  %5.1f %%\n", "total", dead, all, 100 * dead / all; \
		      exit (100 * dead < min * all) }'

lint: setup
	$(VENV)/bin/ruff check oncofusion apps bundles sample_data tests bench plugins

clean:
	rm -rf $(VENV) $(SAMPLE_DIR) $(BONE_DIR) $(THYROID_DIR) $(RECTAL_DIR) $(DEMO_DIR) runs
