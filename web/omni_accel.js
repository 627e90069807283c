// Shows the Sampler's run summary (what ran, what each accelerator skipped) on the node after each run.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SUMMARY_WIDGET = "run_summary";

app.registerExtension({
  name: "OmniAccel.RunSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "OmniSampler") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? message.text.join("\n") : "";
      let widget = this.widgets?.find((w) => w.name === SUMMARY_WIDGET);
      if (!widget) {
        // Created on the first run, after the node's own widgets, and never saved with the workflow.
        widget = ComfyWidgets.STRING(this, SUMMARY_WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false;
        widget.options.read_only = true;
        if (widget.inputEl) widget.inputEl.readOnly = true;
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
