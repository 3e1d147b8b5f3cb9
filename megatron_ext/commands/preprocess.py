"""``megatron-ext preprocess --input ... --output-prefix ... --tokenizer-type ...``: tokenize text /
JSON-lines corpora into megatron-core indexed datasets (the same as ``tools/preprocess_data.py``;
megatron_ext/data/preprocess.py)."""

PASS_THROUGH = True  # parsed by the preprocessing tool's own parser


def add_parser(sub):
    sub.add_parser("preprocess", help="tokenize corpora into .bin/.idx indexed datasets", add_help=False)


def run_argv(argv) -> int:
    from megatron_ext.data.preprocess import main

    try:
        return main(argv)
    except SystemExit as e:  # the tool exits 2 after its one error line
        return e.code if isinstance(e.code, int) else 1
