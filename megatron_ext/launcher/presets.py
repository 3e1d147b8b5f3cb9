"""``MODEL_ARCH`` presets: the sizes users know plus small ones for laptops and CI. Individual
variables (NLAYERS, HIDDEN, ...) override a preset. Every value is printed by ``DRY_RUN=1``."""

# layers, hidden, ffn, heads, kv heads, seq, rope theta
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
}

ALIASES = {"auroragpt-2b": "2B", "auroragpt-7b": "7B", "llama-7b": "7B", "llama2-7b": "7B"}


def preset_name(name: str):
    """Canonical preset name for ``name`` (case-insensitive, aliases), or None."""
    lookup = {k.lower(): k for k in MODEL_PRESETS}
    key = name.strip().lower()
    return lookup.get(key) or ALIASES.get(key)
