// Shows the Sampler's run summary (what ran, what each accelerator skipped) on the node after each run.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
import { api } from "../../scripts/api.js";

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

// The cache nodes take an OMNI_PIPE or ComfyUI's MODEL on `pipe` and return the same kind: the backend declares the
// output as either type (ComfyUI 0.3.75 has no output type that follows an input), and here the output socket
// takes the type of what is connected to `pipe` (both when nothing is), so a MODEL only links to MODEL inputs and
// an OMNI_PIPE only to the pack's nodes. Links the new type cannot feed are removed.
const CACHE_NODES = ["OmniTeaCache", "OmniCacheDiT"];
const EITHER = "OMNI_PIPE,MODEL";
const KINDS = ["OMNI_PIPE", "MODEL"];

function linkOf(graph, id) {
  if (id == null || !graph) return null;
  return graph.getLink?.(id) ?? graph.links?.get?.(id) ?? graph.links?.[id] ?? null;
}

function incomingKind(node) {
  const input = node.inputs?.find((slot) => slot.name === "pipe");
  const link = linkOf(node.graph, input?.link);
  if (!link) return null;
  if (KINDS.includes(link.type)) return link.type;
  const origin = node.graph.getNodeById(link.origin_id);
  const type = origin?.outputs?.[link.origin_slot]?.type;
  return KINDS.includes(type) ? type : null;
}

function followInput(node) {
  const output = node.outputs?.[0];
  if (!output) return;
  const type = incomingKind(node) ?? EITHER;
  if (output.type === type) return;
  output.type = type;
  for (const id of [...(output.links ?? [])]) {
    const link = linkOf(node.graph, id);
    if (!link) continue;
    const target = node.graph.getNodeById(link.target_id);
    const accepts = target?.inputs?.[link.target_slot]?.type;
    if (type !== EITHER && accepts != null && !LiteGraph.isValidConnection(type, accepts)) {
      target.disconnectInput(link.target_slot);
    } else {
      link.type = type;
    }
  }
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "OmniAccel.CacheOutputFollowsInput",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!CACHE_NODES.includes(nodeData.name)) return;
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (side, slot, connected, linkInfo, ioSlot) {
      const result = onConnectionsChange?.apply(this, arguments);
      if (side === LiteGraph.INPUT && this.inputs?.[slot]?.name === "pipe") followInput(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      followInput(this);  // a loaded workflow: its links are in the graph already
      return result;
    };
  },
});

// The Sampler shows the family inputs (num_frames, guidance, cfg_2, boundary_ratio) that the model its pipe comes
// from uses, and hides the others: the Omni Loader upstream (through the acceleration nodes' `pipe` inputs)
// names the model, and GET /omni_accel/family says its family's inputs. Hidden widgets keep their values and
// are saved and sent as before (the backend notes an ignored one), so workflows and API prompts are unchanged.
// A node's saved size is kept when a workflow loads; it is fitted when the model or the link changes.
const familyAnswers = new Map();

function familyOf(model) {
  if (!familyAnswers.has(model)) {
    familyAnswers.set(model, api.fetchApi(`/omni_accel/family?model=${encodeURIComponent(model)}`)
      .then((response) => (response.ok ? response.json() : null)).catch(() => null));
  }
  return familyAnswers.get(model);
}

function loaderOf(node) {
  const seen = new Set();
  let current = node;
  while (current && !seen.has(current.id)) {
    seen.add(current.id);
    if (current.type === "OmniLoader") return current;
    const link = linkOf(current.graph, current.inputs?.find((slot) => slot.name === "pipe")?.link);
    current = link ? current.graph.getNodeById(link.origin_id) : null;
  }
  return null;
}

async function showFamilyInputs(sampler, fit) {
  const model = loaderOf(sampler)?.widgets?.find((w) => w.name === "model")?.value;
  const family = model ? await familyOf(model) : null;
  let changed = false;
  for (const widget of sampler.widgets ?? []) {
    if (!family?.family_inputs?.includes(widget.name)) continue;
    const hidden = !family.uses.includes(widget.name);
    changed ||= Boolean(widget.hidden) !== hidden;
    widget.hidden = hidden;
  }
  sampler.omniFamily = family?.family ?? null;
  if (changed && fit) sampler.setSize([sampler.size[0], sampler.computeSize()[1]]);
  sampler.setDirtyCanvas?.(true, true);
}

function samplersFed(graph) {
  return (graph?._nodes ?? graph?.nodes ?? []).filter((node) => node.type === "OmniSampler");
}

app.registerExtension({
  name: "OmniAccel.SamplerShowsFamilyInputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "OmniSampler") {
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function (side, slot) {
        const result = onConnectionsChange?.apply(this, arguments);
        if (side === LiteGraph.INPUT && this.inputs?.[slot]?.name === "pipe" && !this.omniLoading) showFamilyInputs(this, true);
        return result;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        this.omniLoading = true;  // the graph's links arrive with it: look once it is in place
        setTimeout(() => { this.omniLoading = false; showFamilyInputs(this, false); }, 0);
        return result;
      };
    }
    if (nodeData.name === "OmniLoader") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        const widget = this.widgets?.find((w) => w.name === "model");
        const callback = widget?.callback;
        if (widget) {
          widget.callback = (...args) => {
            const answer = callback?.apply(widget, args);
            for (const sampler of samplersFed(this.graph)) {
              if (loaderOf(sampler) === this) showFamilyInputs(sampler, true);
            }
            return answer;
          };
        }
        return result;
      };
    }
  },
});
