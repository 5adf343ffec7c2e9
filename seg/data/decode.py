"""Decoding one sample: the RGB image, and the mask as class ids whatever its encoding (`MaskDecoder`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from seg.data.classes import IGNORE_INDEX, ClassTable
from seg.data.layouts import VIDEO, SplitFiles
from seg.data.file_names import check_utf8_name
from seg.data.video_frames import parse_frame_name, read_frame
from seg.runtime.errors import SegError


_TOLD_ORIENTATION: set[str] = set()


def exif_orientation(path: Path) -> int:
    """A JPEG's EXIF orientation tag (1 = as stored) from its header, without decoding the pixels."""
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return 1
    from PIL import Image

    try:
        with Image.open(path) as img:
            value = img.getexif().get(0x0112, 1)
    except Exception:  # no readable EXIF: the pixels are what they are
        return 1
    return value if isinstance(value, int) else 1


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3, the pixels as stored. An EXIF orientation tag is not applied (DESIGN: masks
    carry no orientation and are drawn on the stored pixel array, as mmcv and PIL-based readers
    assume); where a tag asks for a turn, seg says so once per process."""
    check_utf8_name(path)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise SegError(f"{path}: cannot read image (missing, corrupt or not an image)")
    orientation = exif_orientation(path)
    if orientation != 1 and "told" not in _TOLD_ORIENTATION:
        _TOLD_ORIENTATION.add("told")
        warnings.warn(f"{path}: EXIF orientation {orientation} is not applied: seg reads images and masks as "
                      "their pixels are stored (the tag only tells viewers to turn the picture)", stacklevel=2)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def map_mask(raw: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    """Raw values -> uint8 class ids; any value the table does not know is an error naming it."""
    if raw.dtype not in (np.uint8, np.uint16):
        raise SegError(f"{path}: mask pixels are {raw.dtype}; expected 8- or 16-bit unsigned raw values")
    ids = lut[raw]
    if (ids < 0).any():
        unknown = np.unique(raw[ids < 0])
        shown = ", ".join(str(int(v)) for v in unknown[:10])
        raise SegError(f"{path}: unknown mask value(s) {shown}"
                       + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                       + (" (not in the class table: 255 is usually 'void', which a table lists in ignore_values; "
                          "--classes with names ignores it)" if 255 in unknown else
                          " (not in the class table: give them to a class's values, or to ignore_values, in the "
                          "table passed with --classes)"))
    return ids.astype(np.uint8)


def read_pair(image_path: Path, mask_path: Optional[Path], decoder: Optional[MaskDecoder]
              ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Image (RGB uint8) and its class-id mask (uint8) at the original size; no mask when
    mask_path or decoder is None."""
    image = read_image(image_path)
    if mask_path is None or decoder is None:
        return image, None
    ids = decoder.read(mask_path)
    problem = mask_size_problem(mask_path, ids.shape[:2], image.shape[:2])
    if problem:
        raise SegError(problem)
    return image, ids


def mask_size_problem(mask_path: Path, mask_hw: tuple[int, int], image_hw: tuple[int, int]) -> Optional[str]:
    """The one-line problem of a mask whose size is not its image's, with the fix; None when they agree."""
    if tuple(mask_hw) == tuple(image_hw):
        return None
    return (f"{mask_path}: mask is {mask_hw[1]}x{mask_hw[0]} but its image is {image_hw[1]}x{image_hw[0]} (masks must "
            "have their image's size: resize with nearest-neighbour, or check that the mask belongs to this image)")


def read_split_pair(files: SplitFiles, i: int, decoder: Optional[MaskDecoder]
                    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    if files.layout == VIDEO:  # a frame, read from the video itself
        _, index = parse_frame_name(files.names[i])
        return read_frame(files.image_path(i), index), None
    return read_pair(files.image_path(i), files.mask_path(i) if files.has_masks else None, decoder)


@dataclass(frozen=True)
class MaskDecoder:
    """Mask file -> uint8 class ids through a class table, whatever the encoding:
    - single-channel 8- or 16-bit values (Falcon's raw values, Cityscapes label ids, ADE20K indices)
      through the table's values;
    - palette PNGs (Pascal VOC) by palette INDEX, never by colour (OpenCV would expand the palette);
    - colour-coded RGB masks through the table's colours.
    Any value or colour the table does not know is an error naming the file and it."""

    lut: np.ndarray                         # raw value or palette index -> class id, -1 unknown
    colors: tuple[tuple[int, int, int], ...]  # RGB of class i, for colour-coded masks
    ignore_colors: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def of(cls, table: ClassTable, ignore_colors: tuple[tuple[int, int, int], ...] = ()) -> "MaskDecoder":
        return cls(table.lut(), tuple(table.colors), ignore_colors)

    def read(self, path: Path) -> np.ndarray:
        check_utf8_name(path)
        if _is_palette_png(path):
            return map_mask(_palette_indices(path), self.lut, path)
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise SegError(f"{path}: cannot read mask (missing, corrupt or not an image)")
        if raw.ndim == 3:
            bgr = raw[..., :3]
            if np.array_equal(bgr[..., 0], bgr[..., 1]) and np.array_equal(bgr[..., 0], bgr[..., 2]):
                return map_mask(bgr[..., 0], self.lut, path)  # a grey mask saved as RGB
            return self._by_colour(bgr, path)
        return map_mask(raw, self.lut, path)

    def _by_colour(self, bgr: np.ndarray, path: Path) -> np.ndarray:
        if bgr.dtype != np.uint8:
            raise SegError(f"{path}: colour mask pixels are {bgr.dtype}; colour-coded masks are 8-bit RGB")
        packed = (bgr[..., 2].astype(np.uint32) << 16) | (bgr[..., 1].astype(np.uint32) << 8) | bgr[..., 0]
        colours, inverse = np.unique(packed, return_inverse=True)
        table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(self.colors)}
        if len(table) != len(self.colors):
            raise SegError(f"{path}: a colour-coded mask needs one colour per class, and the class table gives "
                           "two classes the same colour")
        table.update({(r << 16) | (g << 8) | b: IGNORE_INDEX for r, g, b in self.ignore_colors})
        unknown = [int(c) for c in colours if int(c) not in table]
        if unknown:
            shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5])
            raise SegError(f"{path}: unknown mask colour(s) RGB {shown}" + (f" and {len(unknown) - 5} more"
                           if len(unknown) > 5 else "") + " (not in the class table's colours)")
        ids = np.array([table[int(c)] for c in colours], np.uint8)
        return ids[inverse.reshape(packed.shape)]


def raw_mask_values(path: Path) -> np.ndarray:
    """The distinct raw values a single-channel (or palette) mask holds, sorted; a colour mask is
    one line saying its classes are colours, which a table gives."""
    check_utf8_name(path)
    if _is_palette_png(path):
        return np.unique(_palette_indices(path))
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise SegError(f"{path}: cannot read mask (missing, corrupt or not an image)")
    if raw.ndim == 3:
        bgr = raw[..., :3]
        if not (np.array_equal(bgr[..., 0], bgr[..., 1]) and np.array_equal(bgr[..., 0], bgr[..., 2])):
            raise SegError(f"{path}: a colour mask: its classes are colours, which only a JSON class table can "
                           "name (`seg classes --layout voc` prints one with colours to start from)")
        raw = bgr[..., 0]
    return np.unique(raw)


def _is_palette_png(path: Path) -> bool:
    """PNG colour type 3 (indexed), read from the IHDR chunk without decoding the image."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return False
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[25] == 3


def palette_contradiction(path: Path, table: ClassTable) -> Optional[str]:
    """Where a palette PNG's colours contradict the colours a class table gives (on purpose, not
    seg's fallback colours): a sentence naming the file, the index and both colours; else None.
    Palette masks are read by index whatever the colours say; a contradiction hints at a wrong table."""
    from seg.data.classes import fallback_color

    if not _is_palette_png(path):
        return None
    from PIL import Image

    try:
        with Image.open(path) as img:
            palette = img.getpalette() or []
    except (OSError, ValueError):
        return None
    for i, (name, values, color) in enumerate(zip(table.names, table.raw_values, table.colors)):
        if tuple(color) == fallback_color(i):
            continue
        for v in values:
            if 0 <= v < len(palette) // 3 and tuple(palette[3 * v: 3 * v + 3]) != tuple(color):
                return (f"{path}: its palette colours index {v} RGB {tuple(palette[3 * v: 3 * v + 3])}, but the "
                        f"class table gives {name!r} (value {v}) RGB {tuple(color)}; palette masks are read by "
                        "index, so those pixels are taken as " + repr(name) + ": check the table if that is wrong")
    return None


def _palette_indices(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode != "P":
                raise SegError(f"{path}: expected a palette PNG, Pillow reads mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise SegError(f"{path}: cannot read palette mask ({exc})") from None
