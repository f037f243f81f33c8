"""builtin:tiny-llama: built offline, loadable, deterministic, cached once per recipe.

The model itself is built once into the tests' cache (`$QLORA_RAY_CACHE`, which
tests/conftest.py points at .pytest_cache/d/qlora-ray) and shared with the other test
files; only the cache tests build into a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, ROOT

from qlora_ray import builtin
from qlora_ray.builtin import TINY_LLAMA, builtin_dir, builtin_model_config, ensure_builtin
from qlora_ray.config import ConfigError


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_builtin(TINY_LLAMA)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


# ------------------------------------------------------------------ without building


def test_model_config_comes_without_importing_torch_or_transformers():
    # The memory planner calls this and must stay torch-free: check in a clean process.
    code = (
        "import json, sys\n"
        "from qlora_ray.builtin import builtin_model_config, builtin_dir\n"
        "cfg = builtin_model_config('builtin:tiny-llama'); builtin_dir('builtin:tiny-llama')\n"
        "print(json.dumps({'cfg': cfg, 'heavy': [m for m in ('torch', 'transformers', 'tokenizers')"
        " if m in sys.modules]}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     env=env, check=True).stdout)
    assert out["heavy"] == []
    assert out["cfg"]["model_type"] == "llama"
    assert out["cfg"] == builtin_model_config(TINY_LLAMA)


def test_every_linear_dimension_is_a_multiple_of_64_for_4bit_blocks():
    cfg = builtin_model_config(TINY_LLAMA)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dims = {
        "hidden": cfg["hidden_size"],
        "intermediate": cfg["intermediate_size"],
        "q_out": heads * cfg["head_dim"],
        "kv_out": kv * cfg["head_dim"],
    }
    assert {k: v % 64 for k, v in dims.items()} == dict.fromkeys(dims, 0)


def test_unknown_builtin_name_is_a_config_error_naming_key_value_and_fix(tmp_path):
    for call in (lambda: ensure_builtin("builtin:huge-llama", tmp_path),
                 lambda: builtin_model_config("builtin:huge-llama")):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert "`model.name`" in message and "'builtin:huge-llama'" in message
        assert "use builtin:tiny-llama" in message
    assert not (tmp_path / "builtin").exists()


def test_cache_location_follows_the_env_variable_and_the_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_RAY_CACHE", str(tmp_path / "env"))
    assert builtin_dir(TINY_LLAMA).parent == tmp_path / "env" / "builtin"
    assert builtin_dir(TINY_LLAMA, tmp_path / "arg").parent == tmp_path / "arg" / "builtin"
    monkeypatch.delenv("QLORA_RAY_CACHE")
    assert builtin_dir(TINY_LLAMA).parent == Path.home() / ".cache" / "qlora-ray" / "builtin"


def test_recipe_hash_is_stable_and_covers_hyperparameters_and_corpus(monkeypatch):
    first = builtin.recipe_hash()
    assert builtin.recipe_hash() == first
    assert builtin_dir(TINY_LLAMA).name == f"tiny-llama-{first}"
    monkeypatch.setitem(builtin.TRAIN_SETTINGS, "steps", builtin.TRAIN_SETTINGS["steps"] + 1)
    assert builtin.recipe_hash() != first
    monkeypatch.undo()
    monkeypatch.setattr(builtin, "corpus_bytes", lambda: b"a different corpus\n")
    assert builtin.recipe_hash() != first


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(name, out):
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(builtin, "_build", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_builtin(TINY_LLAMA, tmp_path)
    leftovers = [p.name for p in (tmp_path / "builtin").iterdir() if p.is_dir()]
    assert leftovers == []


# ----------------------------------------------------------------------- the built model


def test_built_dir_loads_with_transformers_and_records_its_recipe(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    recipe = json.loads((tiny_dir / "recipe.json").read_text())
    assert tiny_dir.name == f"tiny-llama-{recipe['recipe_hash']}"
    assert recipe["recipe_version"] == builtin.RECIPE_VERSION
    assert recipe["loss_after"] < recipe["loss_before"]
    assert len(tokenizer) == model.config.vocab_size == recipe["tokenizer_vocab_size"]
    # What the planner is told is what was built.
    written = json.loads((tiny_dir / "config.json").read_text())
    static = builtin_model_config(TINY_LLAMA)
    assert {k: written.get(k) for k in static} == static


def test_tokenizer_round_trips_the_dataset_and_has_llama_special_tokens(tokenizer):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    texts = [row[k] for row in rows for k in ("instruction", "input", "output")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(ids)
    assert [t for t, d in zip(texts, decoded, strict=True) if t != d] == []
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>", "</s>", "<pad>", "<unk>")
    assert tokenizer("Apex Bank")["input_ids"][0] == tokenizer.bos_token_id  # like Llama
    # Each answer of the sentiment task is one token, as a response is tokenized.
    for label in ("negative", "neutral", "positive"):
        assert len(tokenizer(label, add_special_tokens=False)["input_ids"]) == 1, label
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<s><|user|>\nHi\n<|assistant|>\n"


def corpus_loss(model, tokenizer) -> float:
    import torch

    lines = builtin.corpus_bytes().decode().splitlines()[:400]
    blocks = builtin._blocks(tokenizer, lines)
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


def test_pretrained_model_predicts_the_corpus_better_than_a_random_init(tiny_dir, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    pretrained = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        random_init = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir)).eval()
    trained, untrained = corpus_loss(pretrained, tokenizer), corpus_loss(random_init, tokenizer)
    assert trained < 0.5 * untrained, (trained, untrained)


def test_a_label_token_can_win_over_its_space_prefixed_twin(tiny_dir, tokenizer):
    """Issue 16 item 7: the answers are tokenized at the start of a line (`negative`), a form
    the corpus never shows, so those tokens start from their `Ġnegative` twin. With tied
    embeddings an exact copy gives both the same logit for every hidden state: the label's
    probability could never pass 1/2 (its loss never below ln 2) and greedy decoding picked
    the twin. The best any final hidden state can do must beat that floor."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    head = AutoModelForCausalLM.from_pretrained(tiny_dir).get_output_embeddings().weight.detach()
    for label in ("negative", "neutral", "positive"):
        own, twin = tokenizer.convert_tokens_to_ids([label, "Ġ" + label])
        assert not torch.equal(head[own], head[twin])
        hidden = torch.zeros(head.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([hidden], lr=0.05)
        for _ in range(300):  # the most favourable hidden state for the label token
            loss = -torch.log_softmax(head @ hidden, dim=0)[own]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert float(loss) < 0.5 * math.log(2), (label, float(loss))


# ---------------------------------------------------------------------------- the cache

BUILD_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from qlora_ray.builtin import ensure_builtin
print(ensure_builtin("builtin:tiny-llama", sys.argv[1]))
"""


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory) -> dict:
    """Two processes ask for the model at once in an empty cache (as two Ray workers would)."""
    cache = tmp_path_factory.mktemp("cache")
    stale = builtin_dir(TINY_LLAMA, cache).parent / f".{builtin_dir(TINY_LLAMA).name}.killed"
    stale.mkdir(parents=True)  # what a build killed half-way leaves behind
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(cache)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    return {"cache": cache, "stale": stale,
            "paths": [out.strip() for out, _ in outs], "logs": "".join(err for _, err in outs)}


@pytest.mark.slow
def test_concurrent_callers_build_once_and_get_the_same_directory(fresh_cache):
    assert fresh_cache["paths"][0] == fresh_cache["paths"][1]
    assert fresh_cache["logs"].count("building builtin:tiny-llama") == 1
    assert not fresh_cache["stale"].exists()
    entries = sorted(p.name for p in Path(fresh_cache["paths"][0]).parent.iterdir() if p.is_dir())
    assert entries == [Path(fresh_cache["paths"][0]).name]  # no temp dirs left over


@pytest.mark.slow
def test_a_shared_cache_is_readable_by_other_users(fresh_cache):
    """A container running as another uid reuses the host's cache: every file is world-readable."""
    built = Path(fresh_cache["paths"][0])
    assert built.stat().st_mode & 0o005 == 0o005
    assert all(f.stat().st_mode & 0o004 for f in built.iterdir()), [
        (f.name, oct(f.stat().st_mode)) for f in built.iterdir()]


@pytest.mark.slow
def test_second_call_reuses_the_cache_without_building(fresh_cache, monkeypatch):
    def must_not_build(name, out):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(builtin, "_build", must_not_build)
    assert str(ensure_builtin(TINY_LLAMA, fresh_cache["cache"])) == fresh_cache["paths"][0]


@pytest.mark.slow
def test_same_recipe_gives_the_same_hash_and_the_same_weights(fresh_cache, tiny_dir):
    import torch
    from safetensors.torch import load_file

    fresh = Path(fresh_cache["paths"][0])
    assert fresh.name == tiny_dir.name
    a, b = load_file(fresh / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (fresh / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
