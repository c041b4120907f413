"""The table of bad inputs and faults, each with its expected outcome, all run.

CLI rows run the installed ``sdkit`` console script in a fresh process and expect exit status 2
(unless the row says otherwise), exactly one line on stderr starting "sdkit: error:" that holds
the row's text (which names the option, value or file), no traceback, and the output folder
left as it was: a file that was there before keeps its bytes, and nothing new appears (no
image, no enlarged copy, no temporary). API rows call the Python API in-process and expect the
row's exception with its text. Rows that need a model load one tiny random pipeline (or a
broken copy of it, ``helpers.BREAKS``); most CLI rows fail before torch is even imported.
"""

import math
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import BREAKS, Payload, broken_copy, build_reference_pipeline, train_tiny_vae
from PIL import Image

EXE = os.path.join(os.path.dirname(sys.executable), "sdkit")
PREVIOUS = b"an older out.png that a failed run must leave as it was"
slow = pytest.mark.slow

# (case, arguments after `sdkit generate "a red circle" -o OUT --steps 1 -q`, text of the one stderr line)
# {model} is the tiny pipeline, {broken:HOW} a copy broken as helpers.BREAKS[HOW], {images} a folder
# of test pictures, {out} the output folder. A row with --model loads it (a few seconds, marked slow;
# the API rows load every broken copy, and test_hardening.py runs more of them through sdkit.cli.main).
CLI = [
    ("guidance inf", ["--guidance", "inf"], "--guidance inf must be a finite number >= 0"),
    ("guidance nan", ["--guidance", "nan"], "--guidance nan must be a finite number >= 0"),
    ("guidance negative", ["--guidance", "-1"], "--guidance -1 must be a finite number >= 0 (0 to 1: no guidance"),
    ("guidance not a number", ["--guidance", "seven"], "argument --guidance: invalid float value: 'seven'"),
    ("rescale above 1", ["--guidance-rescale", "2"], "--guidance-rescale 2 must be a finite number between 0 and 1"),
    ("rescale nan", ["--guidance-rescale", "nan"], "--guidance-rescale nan must be a finite number between 0 and 1"),
    ("seed past 2**64-1", ["--seed", str(2**64)], f"--seed {2**64} must be -1 (random) or a whole number from 0 to "
                                                  f"{2**64 - 1}"),
    ("seed -2", ["--seed", "-2"], "--seed -2 must be -1 (random)"),
    ("seed + batch past 2**64-1", ["--seed", str(2**64 - 1), "--batch", "2"],
     f"from 0 to {2**64 - 2} for a batch of 2"),
    ("seed not a number", ["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    ("steps 0", ["--steps", "0"], "--steps 0 must be at least 1"),
    ("steps negative", ["--steps", "-5"], "--steps -5 must be at least 1"),
    ("batch 0", ["--batch", "0"], "--batch 0 must be at least 1"),
    ("strength above 1", ["--strength", "1.5", "--init-image", "{images}/rgb.png"], "--strength 1.5 must be between 0 and 1"),
    ("strength nan", ["--strength", "nan", "--init-image", "{images}/rgb.png"], "--strength nan must be between 0 and 1"),
    ("enlarge 0", ["--enlarge", "0"], "--enlarge 0 must be at least 1"),
    ("enlarge negative", ["--enlarge", "-3"], "--enlarge -3 must be at least 1"),
    ("output is a folder", ["-o", "{out}/folder.png"], "folder.png is a folder: give -o a .png file name"),
    ("batch output is a folder", ["-o", "{out}/b.png", "--batch", "2"], "b-2.png is a folder"),
    ("output not .png", ["-o", "{out}/x.jpg"], "x.jpg' must end in .png"),
    ("output folder missing", ["-o", "{out}/missing/x.png"], "missing does not exist: create it"),
    ("mask without init image", ["--mask", "{images}/rgb.png"], "--mask needs --init-image"),
    ("init image missing", ["--init-image", "{images}/none.png"], "--init-image {images}/none.png does not exist"),
    ("init image not an image", ["--init-image", "{images}/text.png"], "--init-image {images}/text.png is not a readable image"),
    ("float image out of range", ["--init-image", "{images}/float3.tif"],
     "--init-image {images}/float3.tif: a PIL image of mode 'F' must hold values in [0, 1], found [3, 3]"),
    ("unknown option", ["--sampling-method", "Euler"], "unrecognized arguments: --sampling-method Euler"),
    ("clip skip 0", ["--clip-skip", "0"], "--clip-skip 0 must be at least 1"),
    ("unknown prompt syntax", ["--prompt-syntax", "comfy"], "argument --prompt-syntax: invalid choice: 'comfy'"),
    pytest.param("too large for memory", ["--model", "{model}", "--width", "100000", "--height", "100000"],
                 "100000x100000 needs about", marks=slow),
    pytest.param("enlarge too large for memory", ["--model", "{model}", "--enlarge", "100000"],
                 "--enlarge 100000 makes a 6400000x6400000 copy", marks=slow),
    pytest.param("guidance 1e30 (NaN latents)", ["--model", "{model}", "--guidance", "1e30", "--steps", "3"],
                 "denoised latents contain NaN or inf values", marks=slow),
    pytest.param("truncated text encoder", ["--model", "{broken:truncated text encoder}"],
                 BREAKS["truncated text encoder"][1], marks=slow),
    pytest.param("pickle text encoder", ["--model", "{broken:pickle text encoder}"], BREAKS["pickle text encoder"][1],
                 marks=slow),
    pytest.param("disk full while writing (file size limit)",
                 ["--model", "{model}", "--enlarge", "32", "--seed", "1", "fsize=14000"],  # out.png fits, x32 not
                 "cannot write {out}/out.x32.png: File too large; free some disk space", marks=slow),
]

# (case, call(env) that must raise, exception type, text); env holds the pipelines and folders
API = [
    ("guidance None", lambda e: e.pipe("a", guidance_scale=None), ValueError,
     "guidance_scale must be a finite number >= 0 (0 to 1: no guidance; 7.5 is usual), got None"),
    ("guidance string", lambda e: e.pipe("a", guidance_scale="7.5"), ValueError, "guidance_scale must be a finite number >= 0"),
    ("guidance negative", lambda e: e.pipe("a", guidance_scale=-1), ValueError, "got -1"),
    ("guidance inf", lambda e: e.pipe("a", guidance_scale=math.inf), ValueError, "got inf"),
    ("guidance bool", lambda e: e.pipe("a", guidance_scale=True), ValueError, "got True"),
    ("guidance 1e30", lambda e: e.pipe("a", guidance_scale=1e30, num_inference_steps=3), ValueError,
     "guidance_scale=1e+30 is far above the usual 1-15: lower it. No image was made."),
    ("numpy latents", lambda e: e.pipe("a", latents=np.zeros((1, 4, 8, 8), np.float32)), ValueError,
     "latents must be a float torch.Tensor (B, C, h, w), got numpy.ndarray"),
    ("integer latents", lambda e: e.pipe("a", latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), ValueError,
     "got a torch.int64 tensor"),
    ("latents of the wrong shape", lambda e: e.pipe("a", latents=torch.zeros(1, 4, 9, 8)), ValueError,
     "latents have shape (1, 4, 9, 8); this call needs (1, 4, 8, 8)"),
    ("too large for memory", lambda e: e.pipe("a", height=100000, width=100000), ValueError,
     "or pass allow_large=True to try anyway"),
    ("allow_large not a bool", lambda e: e.pipe("a", allow_large="yes"), ValueError, "allow_large must be True or False"),
    ("1x1 init image", lambda e: e.img2img("a", image=Image.new("RGB", (1, 1))), ValueError,
     "image is 1x1 pixels, smaller than the VAE's factor 8"),
    ("NaN init image", lambda e: e.img2img("a", image=np.full((64, 64, 3), np.nan, np.float32)), ValueError,
     "image has NaN or inf values"),
    ("all-NaN mask", lambda e: e.inpaint("a", image=Image.new("RGB", (64, 64)),
                                         mask_image=np.full((64, 64), np.nan, np.float32)), ValueError,
     "mask_image has NaN or inf values"),
    ("float image above 1", lambda e: e.img2img("a", image=np.full((64, 64, 3), 2.0, np.float32)), ValueError,
     "float images must be in [0, 1]"),
    ("16-bit image above 65535", lambda e: e.img2img("a", image=Image.fromarray(np.full((64, 64), 70000, np.int32))),
     ValueError, "a PIL image of mode 'I' must hold values in [0, 65535], found [7e+04, 7e+04]"),
    ("fp32 VAE decodes NaN", lambda e: e.nan_vae("a"), ValueError,
     "decoded images (in float32) contain NaN or inf values, which would be written as black pixels"),
    ("scheduler num_train_timesteps 0", lambda e: e.scheduler_class.from_config({"num_train_timesteps": 0}),
     ValueError, "num_train_timesteps must be a whole number >= 1, got 0"),
    ("scheduler beta_start text", lambda e: e.scheduler_class.from_config({"beta_start": "small"}), ValueError,
     "beta_start='small' should be a number"),
    *[(f"model folder: {how}", lambda e, how=how: e.load_broken(how), (ValueError, FileNotFoundError), text)
      for how, (_, text) in BREAKS.items()],
    ("resume runs no pickle payload", lambda e: e.resume_legacy_payload(), ValueError,
     "torch.load(weights_only=True) refused it (WeightsUnpickler error: Unsupported global: GLOBAL io.open"),
    ("resume from damaged tensors", lambda e: e.resume_damaged(), ValueError,
     "cannot read the checkpoint in"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny pipeline, the test pictures and the broken copies, built once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = build_reference_pipeline(root / "model")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "rgb.png")
    (images / "text.png").write_text("not a picture")
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(images / "float3.tif")
    broken = {how: broken_copy(model, root / "broken" / how.replace(" ", "-"), how) for how in BREAKS}
    return {"model": str(model), "images": str(images), "broken": broken, "root": root}


def _command(argv, folders, out):
    """The console-script command of a CLI row (and its file-size limit, if the row has one)."""
    fsize = next((int(a.split("=")[1]) for a in argv if a.startswith("fsize=")), None)
    args = []
    for a in argv:
        if a.startswith("fsize="):
            continue
        if a.startswith("{broken:"):
            a = str(folders["broken"][a[len("{broken:"):-1]])
        args.append(_fill(a, folders, out))
    command = [EXE, "generate", "a red circle", "-o", str(out / "out.png"), "--steps", "1", "-q", *args]
    return command, fsize


def _fill(text, folders, out):
    for key, value in (("{model}", folders["model"]), ("{images}", folders["images"]), ("{out}", str(out))):
        text = text.replace(key, value)
    return text


def _run_row(row, folders):
    case, argv, _ = row
    out = folders["root"] / "out" / case.replace(" ", "-").replace("/", "-")
    out.mkdir(parents=True)
    (out / "out.png").write_bytes(PREVIOUS)
    (out / "folder.png").mkdir()
    (out / "b-2.png").mkdir()
    command, fsize = _command(argv, folders, out)
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, preexec_fn=limit, env=env)
    return proc, out


@pytest.fixture(scope="module")
def cli_runs(request, folders):
    """Run every collected CLI row at once, two processes at a time (most of the time is torch's import)."""
    ids = {item.callspec.params["row"][0] for item in request.session.items
           if getattr(item, "originalname", None) == "test_cli_row"}
    rows = [r for r in _flat(CLI) if r[0] in ids]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip([r[0] for r in rows], pool.map(lambda r: _run_row(r, folders), rows)))


def _flat(rows):
    """Rows as (case, argv, text), whether plain tuples or pytest.param."""
    return [tuple(r.values) if hasattr(r, "values") else r for r in rows]


def test_the_table_has_at_least_40_rows():
    assert len(CLI) + len(API) >= 40
    assert len({r[0] for r in _flat(CLI)}) == len(CLI) and len({r[0] for r in API}) == len(API)


@pytest.mark.parametrize("row", [pytest.param(tuple(r.values), marks=r.marks, id=r.values[0]) if hasattr(r, "values")
                                 else pytest.param(r, id=r[0]) for r in CLI])
def test_cli_row(row, cli_runs, folders):
    case, _, text = row
    proc, out = cli_runs[case]
    text = _fill(text, folders, out)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("sdkit: error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert text in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(out)) == ["b-2.png", "folder.png", "out.png"]  # nothing new, no temporaries
    assert (out / "out.png").read_bytes() == PREVIOUS
    assert not any(p.name == "PWNED" for p in folders["root"].rglob("PWNED"))


class Env:
    """What the API rows call: the pipelines on the tiny model and a few prepared faults."""

    def __init__(self, folders, tmp_path):
        from sdkit import Img2ImgPipeline, InpaintPipeline, StableDiffusionPipeline

        self.folders, self.tmp = folders, tmp_path
        self.sd = StableDiffusionPipeline.from_pretrained(folders["model"])
        self.sd.set_progress_bar_config(disable=True)
        self.img2img = lambda *a, **k: Img2ImgPipeline.from_pipe(self.sd)(*a, num_inference_steps=2, **k)
        self.inpaint = lambda *a, **k: InpaintPipeline.from_pipe(self.sd)(*a, num_inference_steps=2, **k)
        self.scheduler_class = type(self.sd.scheduler)

    def pipe(self, *args, **kwargs):
        return self.sd(*args, **{"num_inference_steps": 1, **kwargs})

    def nan_vae(self, prompt):
        import copy

        vae = copy.deepcopy(self.sd.vae)
        with torch.no_grad():
            vae.post_quant_conv.bias.fill_(math.nan)
        return type(self.sd).from_pipe(self.sd, vae=vae)(prompt, num_inference_steps=1)

    def load_broken(self, how):
        from sdkit import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(self.folders["broken"][how])

    def resume_legacy_payload(self):
        """A run folder whose old-style training_state.pt holds a pickle payload, resumed."""
        run = self.tmp / "run"
        (run / "checkpoint").mkdir(parents=True)
        torch.save({"step": 1, "models": {"vae": Payload(self.tmp / "PWNED")}}, run / "checkpoint" / "training_state.pt")
        return train_tiny_vae(run)

    def resume_damaged(self):
        """A run folder whose checkpoint tensors were cut short, resumed."""
        run = self.tmp / "run2"
        train_tiny_vae(run, stop_at=1)
        tensors = run / "checkpoint" / "tensors.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:100])
        return train_tiny_vae(run)


@pytest.fixture(scope="module")
def env(folders, tmp_path_factory):
    return Env(folders, tmp_path_factory.mktemp("api"))


@pytest.mark.parametrize("row", API, ids=[r[0] for r in API])
def test_api_row(row, env):
    case, call, kind, text = row
    before = set(env.tmp.rglob("*.png"))
    with pytest.raises(kind) as raised:
        call(env)
    message = str(raised.value)
    assert text in message and "\n" not in message, message
    assert set(env.tmp.rglob("*.png")) == before
    assert not list(env.folders["root"].rglob("PWNED")) and not list(env.tmp.rglob("PWNED"))
