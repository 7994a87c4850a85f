"""Radiotherapy structures of the phantom and the models: TG-263 names, groups and display colours."""
from __future__ import annotations

# Order is the channel order of every label volume and every segmentation output.
STRUCTURE_NAMES: tuple[str, ...] = (
    "GTVp", "GTVn", "CTVn", "SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Bone_Mandible", "Larynx",
)
TARGET_NAMES: tuple[str, ...] = ("GTVp", "GTVn", "CTVn")
OAR_NAMES: tuple[str, ...] = ("SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Bone_Mandible", "Larynx")

# RGB in 0..255, as RTSTRUCT ROIDisplayColor and preview overlays use them.
STRUCTURE_COLOURS: dict[str, tuple[int, int, int]] = {
    "GTVp": (255, 0, 0),
    "GTVn": (255, 128, 0),
    "CTVn": (255, 255, 0),
    "SpinalCord": (0, 255, 255),
    "Brainstem": (0, 128, 255),
    "Parotid_L": (0, 255, 0),
    "Parotid_R": (128, 255, 128),
    "Bone_Mandible": (255, 0, 255),
    "Larynx": (160, 32, 240),
}
