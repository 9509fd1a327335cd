"""splitsense: edge-cloud sensing with adaptive offloading of split deep models.

Packages (top level of the repository):
    pipelines/   models cut into stages, data, compression, codecs, profiles (shared by both sides)
    edge/        device runtime (never imports cloud/, Ray or Redis)
    cloud/       broker, Ray Serve tails, controller, plan store
    simulators/  device classes, trace-driven links, energy, fleet runner
    splitsense/  the CLI, the one config object, the one error tree, generated wire code (v1/)
"""

__version__ = "0.1.0"
