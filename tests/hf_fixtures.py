"""Shared pieces of the Hugging Face tests (tests/test_hf_*.py): tiny ``transformers`` models and
tokenizers built here (no hub), a local Hugging Face cache laid out as ``hf download`` writes it,
and our model in this process."""
import os
import shutil

import pytest
import torch

from test_tokenizers import SAMPLES, corpus_lines

SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_level_tokenizer(folder, vocab_size=400):
    """A byte-level BPE tokenizer.json trained on the test corpus, saved with its config."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_lines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                   unk_token="<unk>")
    wrapped.save_pretrained(str(folder))
    return len(tok.get_vocab())


def tiny_hf_model(folder, architecture="LlamaForCausalLM", seed=0, **config):
    """A randomly initialised ``architecture`` (norm weights perturbed, attention sharpened) with a
    tokenizer, saved to ``folder``."""
    import transformers

    os.makedirs(folder, exist_ok=True)
    vocab = byte_level_tokenizer(folder)
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                  bos_token_id=1, eos_token_id=2)
    kwargs.update(config)
    torch.manual_seed(seed)
    cfg = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**kwargs)
    model = getattr(transformers, architecture)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "q_proj" in name or "k_proj" in name:  # sharp attention: positions (rope) matter to the logits
                p.mul_(10.0)
    model.save_pretrained(str(folder))
    return str(folder)


def fake_hub_cache(cache_root, repo_id, source, revision_hash="0123456789abcdef0123456789abcdef01234567"):
    """Put ``source``'s files into a Hugging Face cache at ``cache_root`` as repo ``repo_id``."""
    repo = os.path.join(str(cache_root), "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision_hash)
    shutil.copytree(str(source), snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision_hash)
    return snapshot


@pytest.fixture(scope="module")
def one_process_megatron():
    """torch.distributed (one process) and megatron-core's parallel state in this pytest process,
    released after the module's tests."""
    from megatron.core import parallel_state as ps

    from megatron_ext.hf.reference_model import single_process

    single_process()
    yield
    ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def command_env(monkeypatch):
    """The variables our commands set for their own process, restored after an in-process call."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                 "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, os.environ[name]) if name in os.environ else monkeypatch.delenv(name, raising=False)


__all__ = ["SAMPLES", "corpus_lines", "byte_level_tokenizer", "tiny_hf_model", "fake_hub_cache",
           "one_process_megatron", "command_env"]
