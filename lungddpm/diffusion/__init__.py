"""Layout-conditioned 3D diffusion: the network (``unet``), the process (``process``), training and sampling."""
