"""3D backbones (ResEnc, STU-Net, Primus, SwinUNETR) and 2D backbones applied to volumes."""
