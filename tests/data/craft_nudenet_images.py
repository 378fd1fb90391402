"""Write the two PNGs that tests/test_pinned_eval.py feeds to NudeNet: drawings of flat shapes (a cartoon
face; two skin-coloured ellipses) nudged by random rectangles until NudeNet's bundled 320n detector reports
a class on them (FACE_FEMALE; BUTTOCKS_EXPOSED). They depict nothing: they are false positives found by
search, so that the scorer's tests run on NudeNet's real output with real detections in it.

    python tests/data/craft_nudenet_images.py        # needs nudenet; about a minute on one CPU core
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 160


def face() -> np.ndarray:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([40, 27, 120, 133], fill=(230, 200, 180))
    d.ellipse([54, 55, 66, 67], fill=(40, 40, 40))
    d.ellipse([94, 55, 106, 67], fill=(40, 40, 40))
    d.chord([62, 95, 98, 115], 0, 180, fill=(160, 60, 60))
    return np.asarray(img)


def blobs() -> np.ndarray:
    img = Image.new("RGB", (SIZE, SIZE), (90, 90, 110))
    d = ImageDraw.Draw(img)
    d.ellipse([22, 40, 84, 130], fill=(225, 180, 160))
    d.ellipse([76, 40, 138, 130], fill=(225, 180, 160))
    return np.asarray(img)


def class_score(detector, rgb: np.ndarray, label: str) -> float:
    """The detector's best score for `label` before its 0.2 cut and NMS (rgb -> the BGR it expects)."""
    from nudenet.nudenet import _read_image, __labels as labels  # the package's own preprocessing
    blob = _read_image(np.ascontiguousarray(rgb[..., ::-1]), detector.input_width)[0]
    out = np.squeeze(detector.onnx_session.run(None, {detector.input_name: blob})[0]).T
    return float(out[:, 4 + labels.index(label)].max())


def craft(detector, start: np.ndarray, label: str, target: float, seed: int, steps: int = 4000) -> np.ndarray:
    """Greedy random search: keep a random rectangle's colour shift when it raises the label's score."""
    rng, img = np.random.default_rng(seed), start.astype(np.int16)
    best = class_score(detector, start, label)
    for _ in range(steps):
        if best >= target:
            break
        cand = img.copy()
        x, y = rng.integers(0, SIZE - 8, 2)
        w, h = rng.integers(3, 20, 2)
        cand[y:y + h, x:x + w] += rng.integers(-60, 61, 3).astype(np.int16)
        cand = cand.clip(0, 255)
        score = class_score(detector, cand.astype(np.uint8), label)
        if score > best:
            img, best = cand, score
    print(f"{label}: {best:.3f}")
    return img.astype(np.uint8)


if __name__ == "__main__":
    from nudenet import NudeDetector
    det = NudeDetector()
    Image.fromarray(craft(det, face(), "FACE_FEMALE", 0.7, seed=0)).save(HERE / "nudenet_face.png")
    Image.fromarray(craft(det, blobs(), "BUTTOCKS_EXPOSED", 0.7, seed=1)).save(HERE / "nudenet_exposed.png")
