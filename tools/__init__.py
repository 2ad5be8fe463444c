"""Doc generators and studies: run from the repository root as ``python -m tools.NAME`` (with the
package installed). They import keras_dmr; nothing in keras_dmr imports them."""
