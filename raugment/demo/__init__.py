"""The embedded demo world, imported by nothing but the CLI.

The mini-world, the captioned corpus and its HTTP server, the mini diffusion model, tiny bundles,
`raugment demo`.
"""
