"""`raugment models tiny DIR` writes every part in its real on-disk format, once."""

import json

from raugment.cli import main


def test_models_tiny_writes_every_part_loadable_and_skips_on_rerun(tmp_path):
    import torch

    from raugment.demo.tiny import PARTS
    from raugment.models.aesthetic import load_aesthetic
    from raugment.models.classifier import load_classifier
    from raugment.models.clip import load_clip

    out = tmp_path / "tiny"
    assert main(["models", "tiny", str(out)]) == 0
    for part in PARTS:
        assert (out / part / ".complete").exists(), part
    # the diffusers layout, read by from_pretrained elsewhere (tests/test_diffusion_models.py)
    index = json.loads((out / "sd" / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker"} <= set(index)

    clip = load_clip(str(out / "clip"))
    emb = clip.embed_texts(["A photo of redcircle."])
    assert emb.shape == (1, clip.dim) and abs(float((emb ** 2).sum()) - 1.0) < 1e-4
    scores = load_aesthetic(str(out / "aesthetic"), clip.dim).score(emb)
    assert scores.shape == (1,)
    model = load_classifier(out / "classifier")
    logits = model(torch.zeros(1, 3, 32, 32))
    assert logits.ndim == 2 and logits.shape[0] == 1

    stamp = (out / "sd" / "model_index.json").stat().st_mtime_ns
    assert main(["models", "tiny", str(out)]) == 0
    assert (out / "sd" / "model_index.json").stat().st_mtime_ns == stamp  # kept, not rewritten
