"""smit_convert: converts foreign weights and prints the load report; bad input is one line, exit 2."""
import json

import torch

from nnunet_smit.checkpoint import load_encoder_checkpoint
from nnunet_smit.convert_cli import main


def test_convert_official_weights(tmp_path, reference_dir, capsys):
    shapes = json.loads((reference_dir / "official_pretrain_encoder_keys.json").read_text())
    sd = {k: (torch.randint(0, 343, s) if "index" in k else torch.randn(s)) for k, s in shapes.items()}
    src = tmp_path / "pre_train_weight.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, src)
    dst = tmp_path / "smit_small.pt"
    assert main([str(src), "-o", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "source layout: official_pretrain" in out
    assert "loaded 144 tensors; missing keys: 0; unexpected keys: 0; shape mismatches: 0" in out
    ckpt = load_encoder_checkpoint(dst)
    assert ckpt.source == "nnunet_smit" and ckpt.config.legacy_window_reverse
    assert ckpt.summary["converted_from"] == "official_pretrain"
    assert torch.equal(ckpt.state_dict["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])


def test_bad_file_gives_one_line_error(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main([str(bad), "-o", str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "out.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
