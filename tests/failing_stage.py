"""A stage type that always fails, registered as a plugin by tests (``plugins: [tests.failing_stage]``)."""

from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageParams


class FailParams(StageParams):
    message: str = "failure"


@register_stage("test.fail")
class Fail(Stage):
    Params = FailParams
    input_roles = ("source",)

    def run(self, ctx: StageContext) -> None:
        ctx.write_text("partial.txt", "written before the failure")
        raise OSError(ctx.params.message)  # type: ignore[attr-defined]
