"""Downstream evaluation: nnU-Net v2 nodule segmentation trained per arm (real, real + synthetic, ...), scored on
the real test split. ``arms`` is light (Snakemake parses it); ``nnunet`` drives nnU-Net in a child process;
``evaluate`` scores predictions and compares arms."""
