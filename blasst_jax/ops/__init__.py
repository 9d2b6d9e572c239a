"""One op per backend and family, the shape of tokamax's `ops/attention`.

    ops/base.py                 AttentionResult, on_gpu / is_hopper, the
                                implementation registry (`get_op`,
                                `default_op`)
    ops/attention/              prefill: base (interface, Pallas vjp),
                                reference, pallas_triton, pallas_mosaic_gpu
    ops/decode/                 decode: base (interface, split-K merge),
                                reference, pallas_triton, pallas_mosaic_gpu

Each op checks what it can run, owns its kernel config default and tiles,
and returns an `AttentionResult`; the kernels themselves live in
`blasst_jax.kernels`.
"""
