"""MLflow "model from code" entry: makes a registered indai model loadable with
`mlflow.pyfunc.load_model`. MLflow copies this file into the model and runs it on load; it
only wires IndaiModel (no pickle is involved)."""
import mlflow
import pandas as pd

from indai.platform.model_format import IndaiModel


class IndaiPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pathlib import Path

        self.model = IndaiModel.load(Path(context.artifacts["indai_model"]))

    # annotated pd.DataFrame: what pyfunc hands over after it checked the input against the
    # model's signature (given at logging); MLflow infers nothing from this hint and wraps nothing
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            rows = [{k: v for k, v in r.items() if v is not None and not (isinstance(v, float) and v != v)}
                    for r in model_input.to_dict(orient="records")]
        else:
            rows = list(model_input)
        out = self.model.predict(rows)
        if out and "text" in out[0]:  # a report writer (platform.report_format): generated text
            return pd.DataFrame({"text": [o["text"] for o in out]})
        if out and "label" not in out[0]:  # regression {"value"} or anomaly {"score", "anomaly", "threshold"}
            return pd.DataFrame(out)
        return pd.DataFrame({"label": [o["label"] for o in out],
                             "probabilities": [list(o["probabilities"].values()) for o in out]})


mlflow.models.set_model(IndaiPyfunc())
