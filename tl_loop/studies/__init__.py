"""Reproducible studies built on the library (each one a module with a ``python -m`` command).

=======================  ==================================================================
module                   what it reproduces
=======================  ==================================================================
``random_init``          the seed paper's random-initialisation experiment: do randomly
                         initialised looped blocks reach stable fixed points, depending on
                         block size, input injection and normalisation? (no training)
``training_sweep``       the design study's training sweep: small looped models trained on
                         variable binding over block size x injection x normalisation x norm
                         between steps; accuracy by inference steps, fixed points, attention
                         stabilisation of every trained model
=======================  ==================================================================

Results and their reading are in ``docs/design_study.md``.
"""
