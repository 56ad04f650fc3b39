"""Class-conditional diffusion generators: training (`train`, `train_vae`),
the checkpoint folder format (`model`), and sampling (`sample`). The
`diffusion` generation method in `ddchallenge.generators.diffusion` runs
them under the track rules."""
