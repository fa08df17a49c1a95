"""Research tools and one-off studies. They import the product (decoding, training); nothing in the product imports
them. Each is run as ``python -m experiments.NAME --help``; experiments/README.md says what each is for."""
