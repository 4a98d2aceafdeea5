"""Test-time adaptation methods (each module registers itself; tda and tpt are the CLIP ones)."""
