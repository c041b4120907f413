"""The reference's pipeline-choosing names: ``DiffusionPipeline.from_pretrained`` (the class that
``model_index.json`` names) and ``AutoPipelineForText2Image`` / ``Image2Image`` / ``Inpainting``
(the class of a task, on a folder or on another pipeline's parts).

    pipe = AutoPipelineForText2Image.from_pretrained(path)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)      # same weights, no copy
"""

from . import loading


def pipeline_classes():
    """{reference pipeline class name: sdkit class}, for the classes sdkit has."""
    from .img2img import Img2ImgPipeline
    from .inpaint import InpaintPipeline
    from .txt2img import StableDiffusionPipeline

    return {cls.reference_class_name: cls for cls in (StableDiffusionPipeline, Img2ImgPipeline, InpaintPipeline)}


def class_of_folder(folder):
    """The sdkit pipeline class that ``folder``'s model_index.json names (its ``_class_name``)."""
    name = loading.read_model_index(folder).get("_class_name")
    classes = pipeline_classes()
    if name not in classes:
        raise ValueError(f"{folder / loading.MODEL_INDEX} names the pipeline {name!r}, which sdkit does not have; "
                         f"sdkit has {', '.join(classes)}: load it with one of those classes.")
    return classes[name]


def from_index(name_or_path, variant=None, local_files_only=False, **kwargs):
    """``DiffusionPipeline.from_pretrained``: the class the folder's model_index.json names, loaded from it."""
    hub = {k: kwargs[k] for k in loading.HUB_KEYWORDS if k in kwargs}
    folder = loading.resolve_pipeline_folder(name_or_path, loading.STABLE_DIFFUSION, variant, local_files_only, hub)
    return class_of_folder(folder).from_pretrained(folder, variant=variant, local_files_only=local_files_only,
                                                   **kwargs)


class AutoPipeline:
    """The pipeline class of one task, chosen as the reference's AutoPipelineFor* classes choose it."""

    task_class_name = None  # the reference class name of this task's pipeline

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not built directly: use {type(self).__name__}.from_pretrained(path) "
                        f"or {type(self).__name__}.from_pipe(pipe).")

    @classmethod
    def task_class(cls):
        return pipeline_classes()[cls.task_class_name]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """This task's pipeline on a pipeline folder or repo id (any SD 1.x/2.x folder, as in the reference)."""
        return cls.task_class().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """This task's pipeline on ``pipeline``'s parts (shared, not copied); keywords replace parts."""
        return cls.task_class().from_pipe(pipeline, **kwargs)


class AutoPipelineForText2Image(AutoPipeline):
    task_class_name = "StableDiffusionPipeline"


class AutoPipelineForImage2Image(AutoPipeline):
    task_class_name = "StableDiffusionImg2ImgPipeline"


class AutoPipelineForInpainting(AutoPipeline):
    task_class_name = "StableDiffusionInpaintPipeline"
