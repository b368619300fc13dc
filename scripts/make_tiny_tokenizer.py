"""Regenerate export/families/data/llava_tiny_tokenizer.json, the real (byte-level BPE) tokenizer
of `llava-tiny`: 1023 trained tokens (<pad>=0, <s>=1, </s>=2) + <image> = 1023, BOS added by the
post-processor. Run only if the tiny model's vocabulary must change; the file is committed so
token ids never drift with the corpus or the tokenizers version.

    python scripts/make_tiny_tokenizer.py CORPUS.txt [CORPUS2.txt ...]
"""

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parents[1] / "export" / "families" / "data" / "llava_tiny_tokenizer.json"


def main(paths: list[str]) -> int:
    corpus = "\n".join(Path(p).read_text() for p in paths)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1023, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    if tok.get_vocab_size() != 1023:
        print(f"error: corpus gave {tok.get_vocab_size()} tokens, need 1023; add text", file=sys.stderr)
        return 1
    tok.add_special_tokens(["<image>"])
    assert tok.token_to_id("<image>") == 1023
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(OUT))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
