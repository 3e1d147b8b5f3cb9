"""``MODEL_ARCH`` presets: the sizes users know plus small ones for laptops and CI. Individual
variables (NLAYERS, HIDDEN, ...) override a preset. Every value is printed by ``DRY_RUN=1``.

A preset may add architecture ``flags`` (multi-latent attention, mixture of experts...); they come
before the flags of the launcher's variables and the extra arguments, which therefore win. Where
each number of the DeepSeek-V3-style presets comes from: docs/deepseek_v3.md."""

# DeepSeek-V3-style attention and MoE: MLA, qk-layernorm, dense first layer, shared expert, sigmoid
# router with aux-loss-free expert bias, sequence-level aux loss, group-limited routing.
_OPENSEEK_SMALL_FLAGS = (  # OpenSeek-Small-v1-Baseline's job config (1.4B total, 0.4B active)
    "--multi-latent-attention", "--kv-lora-rank", "512", "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64",
    "--v-head-dim", "128", "--qk-layernorm", "--norm-epsilon", "1e-6", "--tie-embeddings-and-output-weights",
    "--num-experts", "64", "--moe-router-topk", "6", "--moe-ffn-hidden-size", "896",
    "--moe-shared-expert-intermediate-size", "1792", "--moe-first-k-dense", "1",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
    "0.001", "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.0001",
    "--moe-router-num-groups", "1", "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.446",
    "--moe-router-dtype", "fp32",
)
_DEEPSEEK_V3_TINY_FLAGS = (  # every DeepSeek-V3 feature at CPU-demo size (V3's own q low-rank and MTP included)
    "--multi-latent-attention", "--q-lora-rank", "64", "--kv-lora-rank", "32", "--qk-head-dim", "32",
    "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32", "--qk-layernorm", "--norm-epsilon", "1e-6",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "96",
    "--moe-shared-expert-intermediate-size", "96", "--moe-first-k-dense", "1", "--moe-router-score-function",
    "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.001",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.0001", "--moe-router-num-groups",
    "4", "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.5", "--moe-router-dtype", "fp32",
    "--mtp-num-layers", "1",
)

# layers, hidden, ffn, heads, kv heads, seq, rope theta (+ architecture flags)
MODEL_PRESETS = {
    # CPU demo / CI sizes
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                 num_key_value_heads=2, seq_length=128, rope_theta=10000),
    "125M": dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                 num_key_value_heads=12, seq_length=2048, rope_theta=10000),
    "350M": dict(num_layers=24, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                 num_key_value_heads=16, seq_length=2048, rope_theta=10000),
    # AuroraGPT / Llama sizes
    "2B": dict(num_layers=24, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
               num_key_value_heads=8, seq_length=4096, rope_theta=50000),
    "7B": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
               num_key_value_heads=8, seq_length=4096, rope_theta=50000),
    "33B": dict(num_layers=60, hidden_size=6656, ffn_hidden_size=17920, num_attention_heads=52,
                num_key_value_heads=4, seq_length=4096, rope_theta=50000),
    "70B": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                num_key_value_heads=8, seq_length=4096, rope_theta=50000),
    # Public small models
    "llama3-3B": dict(num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24,
                      num_key_value_heads=8, seq_length=8192, rope_theta=500000),
    "smollm3-3B": dict(num_layers=36, hidden_size=2048, ffn_hidden_size=11008, num_attention_heads=16,
                       num_key_value_heads=4, seq_length=4096, rope_theta=5000000),
    "phi4-mini": dict(num_layers=32, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24,
                      num_key_value_heads=8, seq_length=4096, rope_theta=10000),
    # DeepSeek-V3-style mixtures of experts (ffn = the dense first layer's MLP)
    "openseek-small": dict(num_layers=6, hidden_size=1280, ffn_hidden_size=7168, num_attention_heads=10,
                           num_key_value_heads=10, seq_length=4096, rope_theta=1000000, flags=_OPENSEEK_SMALL_FLAGS),
    "deepseek-v3-tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                             num_key_value_heads=4, seq_length=128, rope_theta=10000, flags=_DEEPSEEK_V3_TINY_FLAGS),
}

ALIASES = {"auroragpt-2b": "2B", "auroragpt-7b": "7B", "llama-7b": "7B", "llama2-7b": "7B",
           "openseek-small-v1": "openseek-small", "openseek-small-v1-baseline": "openseek-small"}


def preset_name(name: str):
    """Canonical preset name for ``name`` (case-insensitive, aliases), or None."""
    lookup = {k.lower(): k for k in MODEL_PRESETS}
    key = name.strip().lower()
    return lookup.get(key) or ALIASES.get(key)
