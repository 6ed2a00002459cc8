"""Make the local "pretrained" models and the data that recipes/vision_finetune.yaml and
recipes/text_classification.yaml read, since nothing can be downloaded here:

  python recipes/make_pretrained.py            # writes ./pretrained/ (about a minute on 2 cores)

- pretrained/reviews.csv: 2,000 templated movie reviews (text, label positive/negative),
  deterministic (seeded); negations ("not great") make word order matter a little.
- pretrained/bert-tiny/: a WordPiece tokenizer trained on that CSV with the `tokenizers` library
  and a randomly initialised BERT (hidden 32, 2 layers, no dropout), both save_pretrained.
- pretrained/digits-images/<label>/<n>.png: scikit-learn's 8x8 digits as an image folder.
- pretrained/vit-tiny/: a randomly initialised ViT (16x16 grey images, 4x4 patches, hidden 32,
  2 layers); pretrained/vit-digits/: that ViT after dist-train trained it on digits 0-4 (the
  vision recipe's backbone, a real transformers directory), and
  pretrained/vit-digits-0to4.safetensors: the same weights in dist-train's parameter names
  (`backbone.vit.*`), which `finetune.from` reads.

`--out DIR` writes elsewhere (the recipes then need `model.hf.pretrained=...` and
`data.source=...` overrides, as tests/recipes/test_shipped_recipes.py passes); `--quick`
pretrains the ViT for a few steps only (tests).
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

POSITIVE = ["great", "wonderful", "excellent", "superb", "delightful", "brilliant", "lovely", "fun"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "poor", "dull", "bland"]
SUBJECTS = [
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the music",
    "the ending",
    "the cast",
    "the story",
    "the script",
    "the director's work",
]
TEMPLATES = [
    "{s} was {a}",
    "i thought {s} was {a}",
    "honestly , {s} felt {a} to me",
    "{s} is {a} and the rest is {b}",
    "what a {a} experience , {s} was {b}",
    "my friends said {s} was {a}",
]


def make_reviews(path: Path, rows: int = 2000, seed: int = 0) -> None:
    """label = the sentiment of the adjectives; `not` before the first one flips it (about a
    quarter of the rows), so the model must read more than single words."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(rows):
        positive = rng.random() < 0.5
        words = POSITIVE if positive else NEGATIVE
        negated = rng.random() < 0.25
        template = rng.choice(TEMPLATES)
        if negated:
            template = template.replace("{a}", "not {a}").replace("{b}", "not {b}")
        text = template.format(s=rng.choice(SUBJECTS), a=rng.choice(words), b=rng.choice(words))
        label = "positive" if positive != negated else "negative"
        lines.append(f'"{text}",{label}')
    path.write_text("\n".join(lines) + "\n")


def make_bert(out: Path, csv: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    texts = [line.rsplit(",", 1)[0].strip('"') for line in csv.read_text().splitlines()[1:]]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special)
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    from tokenizers.processors import TemplateProcessing

    fast.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast.save_pretrained(out)
    torch.manual_seed(0)  # the same "pretrained" weights on every run
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(out)


def make_images(out: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * (255 / 16)).astype(np.uint8), mode="L").save(folder / f"{i}.png")


def make_vit(out: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=5,
    )
    ViTForImageClassification(config).save_pretrained(out)


def pretrain_vit(root: Path, quick: bool) -> None:
    """Train vit-tiny on digits 0-4 with the vision recipe itself (no finetune section), then
    save it as a transformers directory and as dist-train's weights file."""
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification

    import dist_train
    from dist_train.config.recipe import load_recipe

    recipe_path = Path(__file__).with_name("vision_finetune.yaml")
    run = root / "vit-pretrain-run"
    steps = ["train.max_steps=3", "train.epochs=1"] if quick else ["train.epochs=12"]
    recipe = load_recipe(
        str(recipe_path),
        [
            f"model.hf.pretrained={root / 'vit-tiny'}",
            f"data.source=imagefolder:{root / 'digits-images'}",
            'data.classes=["0","1","2","3","4"]',
            "~finetune",
            "optimizer.lr=0.003",
            *steps,
        ],
    )
    dist_train.train(recipe, str(run), restart=True)
    state = load_file(str(run / "model.safetensors"))
    shutil.copy(run / "model.safetensors", root / "vit-digits-0to4.safetensors")
    model = ViTForImageClassification.from_pretrained(root / "vit-tiny")
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
    model.save_pretrained(root / "vit-digits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="pretrained", help="output directory")
    parser.add_argument("--quick", action="store_true", help="pretrain the ViT a few steps only")
    args = parser.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    make_reviews(root / "reviews.csv")
    make_bert(root / "bert-tiny", root / "reviews.csv")
    make_images(root / "digits-images")
    make_vit(root / "vit-tiny")
    pretrain_vit(root, args.quick)
    print(f"wrote {root}/: reviews.csv, bert-tiny/, digits-images/, vit-tiny/, vit-digits/")


if __name__ == "__main__":
    main()
