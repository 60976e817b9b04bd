"""fluxgate extended from outside its repository, through its entry-point groups only.

- `specs`: the light declarations the entry points name (the `sdxl-base` model, the `torchao-fp8-row` precision).
- `sdxl`: SDXL's builder (`fluxgate.models.builder.ModelBuilder`): `StableDiffusionXLPipeline` + `UNet2DConditionModel`.
- `torchao_fp8`: torchao's fp8 dynamic row-wise quantization as a load-then-transform `PrecisionFormat`.
- `hooks`: the attention processor set before timing, recorded in the run's environment and declared comparable.

Nothing here is imported by fluxgate until a run reads its registries; `sdxl` and `torchao_fp8` (torch, diffusers,
torchao) only when a combo needs them.
"""
