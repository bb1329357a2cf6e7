"""Checks every bundle under bundles/ must pass, whatever its model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser
from monai.data import DistributedSampler, DistributedWeightedRandomSampler
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import BUNDLES, REPO, SCHEMA, run_bundle

pytest_plugins = ["tests.conftest_bone", "tests.conftest_thyroid", "tests.conftest_opscc"]
pytestmark = pytest.mark.slow


def test_every_model_is_a_bundle_with_the_standard_configs():
    assert {b.name for b in BUNDLES} >= {"lung_nodule_clip", "bone_tumor_matrix"}
    for bundle in BUNDLES:
        for name in ("metadata.json", "inference.json", "train.json", "evaluate.json", "multi_gpu_train.json"):
            assert (bundle / "configs" / name).is_file(), f"{bundle.name} lacks configs/{name}"
        assert (bundle / "docs" / "README.md").is_file(), f"{bundle.name} lacks its model card"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_verifies_against_the_bundle_schema(bundle: Path, tmp_path):
    assert SCHEMA.is_file(), (f"the MONAI bundle schema {SCHEMA} is missing: check out the shared folder beside "
                              "the repository (../shared/schemas), as CI does")
    schema_copy = tmp_path / "schema.json"
    schema_copy.write_text(SCHEMA.read_text())
    result = run_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema_copy),
                        cwd=bundle)
    assert "metadata is verified with no error" in result.stdout + result.stderr


# the tiny data set each bundle's multi-GPU config is parsed on, and overrides that keep it small (and give the
# validation split a case for each of two ranks)
TINY_DATA = {"lung_nodule_clip": ("tiny_lung_data", {"view_pixels": 32, "validation_fraction": 0.4}),
             "bone_tumor_matrix": ("tiny_bone_data", {"validation_fraction": 0.4}),
             "thyroid_llnm": ("tiny_thyroid_data", {"validation_fraction": 0.4}),
             "opscc_smurf": ("tiny_opscc_data", {"validation_fraction": 0.4})}
# bundles whose multi_gpu_train.json shards stage-1 feature extraction over the ranks instead of wrapping a torch
# network in DDP (a booster has no gradient to all-reduce); each is tested in its own module
EXTRACTION_MULTI_GPU = {"rectal_erus_clip": "tests/test_rectal_bundle.py::test_multi_gpu_extraction_gives_each_rank_its_folds"}
TRAINED_BY_DDP = [b for b in BUNDLES if b.name not in EXTRACTION_MULTI_GPU]
# handlers that write checkpoints, logs or event files: on every rank but 0 they would race on the same files
RANK_ZERO_ONLY = {"CheckpointSaver", "StatsHandler", "TensorBoardStatsHandler"}


def _train_parser(bundle: Path, datalist: Path, output: Path, overrides: dict, multi_gpu: bool) -> ConfigParser:
    """train.json, with multi_gpu_train.json merged onto it, as ``monai.bundle run`` reads them."""
    files = ["train.json", "multi_gpu_train.json"] if multi_gpu else ["train.json"]
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in files])
    parser.update({"bundle_root": str(bundle), "datalist_file": str(datalist), "ckpt_dir": str(output / "models"),
                   "output_dir": str(output / "runs"), **overrides})
    return parser


def _on_this_machine(parser: ConfigParser) -> ConfigParser:
    """Without a GPU, the DDP network lives on the CPU: everything else is built as torchrun builds it."""
    if not torch.cuda.is_available():
        parser["device"] = torch.device("cpu")
        if "device_ids" in (parser.get("network") if isinstance(parser.get("network"), dict) else {}):
            parser["network#device_ids"] = None
    return parser


def _expressions(config) -> str:
    """Every ``$`` expression of a config, one per line."""
    if isinstance(config, dict | list):
        return "\n".join(_expressions(v) for v in (config.values() if isinstance(config, dict) else config))
    return config if isinstance(config, str) and config.startswith("$") else ""


def _handler_names(parser: ConfigParser, ids: tuple[str, ...] = ("train#handlers", "validate#handlers")) -> dict:
    return {i: sorted(type(h).__name__ for h in parser.get_parsed_content(i)) for i in ids}


@pytest.fixture()
def one_process_group(tmp_path):
    """A gloo process group of one rank (rank 0), as torchrun's first process has; destroyed afterwards, with
    ignite's own record of it (ignite keeps the group it saw, and a later CheckpointSaver would ask it for a
    rank)."""
    import ignite.distributed as idist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'process_group'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    # ignite has no public way to forget a group it saw that is already destroyed (its finalize() destroys it)
    idist.utils._set_model(idist.utils._SerialModel())


def test_every_multi_gpu_config_is_checked_by_one_test():
    for bundle in BUNDLES:
        if bundle.name in EXTRACTION_MULTI_GPU:
            module, name = EXTRACTION_MULTI_GPU[bundle.name].split("::")
            assert f"def {name}(" in (REPO / module).read_text(), f"{bundle.name}: {EXTRACTION_MULTI_GPU[bundle.name]} is gone"
        else:
            assert bundle.name in TINY_DATA, f"add {bundle.name} to TINY_DATA with the fixture that builds its tiny data"


@pytest.mark.parametrize("bundle", TRAINED_BY_DDP, ids=lambda b: b.name)
def test_multi_gpu_config_resolves_its_overrides(bundle: Path, request, monkeypatch, tmp_path, one_process_group):
    """multi_gpu_train.json merged onto train.json: the trainer, the evaluator and the optimizer use the
    DDP-wrapped train network, both loaders shard through distributed samplers (training keeps the
    balanced class weights), files are written only on rank 0, validation runs on every rank."""
    assert bundle.name in TINY_DATA, f"add {bundle.name} to TINY_DATA with the fixture that builds its tiny data"
    fixture, overrides = TINY_DATA[bundle.name]
    datalist = request.getfixturevalue(fixture)
    monkeypatch.chdir(bundle)  # train.json takes the target from configs/inference.json by a relative macro
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    parser = _train_parser(bundle, datalist, tmp_path, overrides, multi_gpu=True)
    # the overlay's lists replace train.json's: they must still do every step it does and import every module
    # an expression uses
    single_gpu = _train_parser(bundle, datalist, tmp_path / "single", overrides, multi_gpu=False)
    dropped = [step for step in single_gpu.get("run") if step not in parser.get("run")]
    assert not dropped, f"configs/multi_gpu_train.json's 'run' replaces train.json's and drops {dropped}"
    expressions = _expressions(parser.get())
    dropped = [line for line in single_gpu.get("imports") if line not in parser.get("imports")
               and f"{line.split()[-1]}." in expressions]
    assert not dropped, f"configs/multi_gpu_train.json's 'imports' replaces train.json's and drops {dropped}"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parser.get_parsed_content("device") == torch.device("cuda:1")  # each process on its own GPU
    monkeypatch.setenv("LOCAL_RANK", "0")
    _on_this_machine(parser)

    network = parser.get_parsed_content("network")
    assert isinstance(network, DistributedDataParallel)
    assert network.module is parser.get_parsed_content("network_def")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert trainer.network is network and evaluator.network is network
    optimized = {id(p) for group in parser.get_parsed_content("optimizer").param_groups for p in group["params"]}
    assert optimized == {id(p) for p in network.module.parameters() if p.requires_grad}

    datalist_train = parser.get_parsed_content("train#datalist")
    sampler = trainer.data_loader.sampler
    assert isinstance(sampler, DistributedWeightedRandomSampler)
    assert sampler.dataset is parser.get_parsed_content("train#dataset") and sampler.dataset.data == datalist_train
    weights = torch.as_tensor(sampler.weights, dtype=torch.double)
    torch.testing.assert_close(weights, parser.get_parsed_content("target").sample_weights(datalist_train))
    target = parser.get_parsed_content("target")
    strata = [target.stratum(r) for r in datalist_train]  # the class, or the event indicator of a survival target
    per_class = {y: float(weights[[i for i, v in enumerate(strata) if v == y]].sum()) for y in set(strata)}
    assert len(per_class) == 2 and per_class[0] == pytest.approx(per_class[1])  # classes drawn equally often
    validation_sampler = evaluator.data_loader.sampler
    assert isinstance(validation_sampler, DistributedSampler) and not validation_sampler.shuffle
    assert validation_sampler.dataset is parser.get_parsed_content("validate#dataset")
    assert len(list(validation_sampler)) == len(parser.get_parsed_content("validate#datalist"))  # each case once

    # rank 0 keeps every handler of single-GPU training; another rank every one that writes nothing
    single = _handler_names(single_gpu)
    assert _handler_names(parser) == single
    with monkeypatch.context() as rank_one:
        rank_one.setattr(dist, "get_rank", lambda group=None: 1)
        other = _on_this_machine(_train_parser(bundle, datalist, tmp_path / "rank1", overrides, multi_gpu=True))
        other.update({f"{part}#sampler#{key}": value for part in ("train", "validate")
                      for key, value in (("num_replicas", 2), ("rank", 1))})
        handlers = _handler_names(other)
    assert handlers == {i: [n for n in names if n not in RANK_ZERO_ONLY] for i, names in single.items()}
    assert "ValidationHandler" in handlers["train#handlers"]  # the validation set is sharded over every rank

    parser.get_parsed_content("finalize")  # ends the process group
    assert not dist.is_initialized()
