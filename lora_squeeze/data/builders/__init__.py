"""TFDS builders of our own for text tasks that the TFDS catalog lacks (SIQA, MMLU).

Both read the public files from a local folder (TFDS `manual_dir`); nothing is downloaded.
Importing a module registers its builder with TFDS under the task's name.
"""
