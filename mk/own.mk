# `make own-pair` (README, "Your own pair on your own images"): the chain on a folder and a big littlebig did not
# make. tests/own_pair_example.py writes a user-style folder (scikit-learn's 1,797 digits as 32x32 JPEGs, word
# class names) and a timm resnet10t trained on it the way timm's train.py saves it; then littlebig distils a little
# companion on the folder's train share and exports, calibrates, reports and writes the repository. `make own-serve`
# serves it on the usual ports. About 3 minutes on 2 cores (the little's 30 epochs: ~75 s).
OWN ?= $(BUILD)/own
OWN_EPOCHS ?= 30
OWN_BIG := $(OWN)/big/model_best.pth.tar
# paper's T: on 357 val images bounded cannot certify its 0.5-point promise below T=1 (everything to big).
OWN_RULE ?= paper

.PHONY: own-pair own-serve

$(OWN_BIG): | $(STAMP)
	$(BIN)/python -m tests.own_pair_example $(OWN)

$(OWN)/little.safetensors: $(OWN_BIG)
	$(BIN)/littlebig train little --data-dir $(OWN)/digits --teacher $(OWN_BIG) --out $@ \
	  --state-dir $(OWN)/train --epochs $(OWN_EPOCHS) --hflip 0

own-pair: setup $(OWN)/little.safetensors
	$(BIN)/littlebig export --big-weights $(OWN_BIG) --little-weights $(OWN)/little.safetensors \
	  --data-dir $(OWN)/digits --build $(OWN)/build
	$(BIN)/littlebig calibrate --build $(OWN)/build --serve-rule $(OWN_RULE)
	$(BIN)/littlebig report --build $(OWN)/build
	$(BIN)/littlebig repo --build $(OWN)/build --out $(OWN)/model_repository

own-serve: setup
	$(BIN)/littlebig serve --build $(OWN)/build --repository $(OWN)/model_repository \
	  --log-file $(OWN)/tritonserver.log
