"""The experiment configs (`cifar`: training, `eval`: evaluation), importable as a
package by tests and tools, and given to train.py/eval.py as files (FILE.py:ARG)."""
