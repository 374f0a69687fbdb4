"""The embedded demo world: mini-world, the captioned corpus and its HTTP server, the mini diffusion model, tiny bundles, `raugment demo`. Imported by nothing but the CLI."""
