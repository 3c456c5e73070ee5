"""A fixed sample of tests/fuzz.py's cases: bad flags, damaged data, weights and checkpoint files given to
train.py, `train.py --mode=eval` and `python -m slotjax.convert` are refused in one line without a traceback, or
(a damaged latest checkpoint with an intact earlier one) go on from the earlier one after one warning line.

The cases run side by side in subprocesses.
"""

import pytest

from tests import fuzz

SAMPLE = [
    ("flag", dict(arguments=["--config.eval_batch_size=0"], names="eval_batch_size")),
    ("flag", dict(arguments=["--config.compute_dtype=float8"], names="compute_dtype")),
    ("flag", dict(arguments=["--config=configs/discovery.py:fast"], names="fast")),
    ("flag", dict(arguments=["--mode=eval", "--config.slot_size=32"], names="slot_size", existing=True)),
    ("data", dict(dataset="tetrominoes", damage="few records", mode="train")),
    ("data", dict(dataset="multi_dsprites", damage="empty", mode="train")),
    ("data", dict(dataset="objects_room", damage="records of another layout", mode="eval")),
    ("data", dict(dataset="clevr", damage="garbage dataset_info.json", mode="train")),
    ("weights", dict(extension="safetensors", damage="cut short", seed=1)),
    ("weights", dict(extension="safetensors", damage="header garbage", seed=2)),
    ("weights", dict(extension="safetensors", damage="bytes flipped", seed=3)),
    ("checkpoint", dict(damage="array data bytes flipped", command_name="eval")),
    ("checkpoint", dict(damage="manifest.ocdbt missing", command_name="convert", all_steps=True)),
]
BUILDERS = {
    "flag": fuzz.flag_case,
    "data": fuzz.data_case,
    "weights": fuzz.weights_case,
    "checkpoint": fuzz.checkpoint_case,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    fixtures = fuzz.make_fixtures(root / "fixtures", weights_formats=("safetensors",))
    cases = []
    for index, (kind, arguments) in enumerate(SAMPLE):
        directory = root / f"case{index}"
        directory.mkdir()
        cases.append(BUILDERS[kind](directory, fixtures, **arguments))
    return fuzz.run_cases(cases, root / "jax_cache", jobs=2)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SAMPLE)), ids=[f"{kind}-{index}" for index, (kind, _) in enumerate(SAMPLE)])
def test_fuzz_sample(results, index):
    result = results[index]
    assert result.passed, f"{result.case.name}: {result.why}\n{result.output[-3000:]}"
    assert result.why == result.case.expect
