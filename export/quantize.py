"""Weight quantization of the exported graph (filled in below)."""
from __future__ import annotations
