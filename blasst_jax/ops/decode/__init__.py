"""Decode attention ops: reference, pallas_triton, pallas_mosaic_gpu."""
