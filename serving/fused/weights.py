"""What each fused operator family reads and returns: the contract between export and the operators.

The refresh and step operators take the same named inputs and give the same named outputs as
the family's exported `refresh` and `step` graphs (a name missing from a call's feeds is passed
as None), then the packed weights, in the order named here. A name ending in `*` stands for
every state with that prefix, in the program's order: one list argument, or that many outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

WEIGHTS_FILE = "fused.safetensors"

GATED_WEIGHTS = (
    "v0_w", "v0_b", "v_w", "v_b", "link_w", "link_b", "h_b", "class_bias", "h0_w", "h_w", "hout_w", "hout_b",
    "skip_w", "skip_b", "oh_w", "oh_b", "lg_w", "lg_b",
)
# A Gated PixelCNN conditioned on a map m(z) (a PixelVAE's decoder): every layer's 1x1s of the map into
# its vertical and horizontal stacks, cond_w (L, 2, Cc, 2C) and cond_b (L, 2, 2C).
CONDITIONED_GATED_WEIGHTS = (*GATED_WEIGHTS, "cond_w", "cond_b")


PIXELCNN_WEIGHTS = (
    "in_w", "in_b", "reduce_w", "reduce_b", "masked_w", "masked_b", "expand_w", "expand_b", "oh_w", "oh_b", "lg_w",
    "lg_b",
)


# MAF's inverse, in float64: per pixel, layer and hidden unit the W1 column, the shift and scale rows
# (D, K, H); the shift and scale biases (D, K); constants (alpha, pixel levels, log-scale bound, width).
MAF_WEIGHTS = ("columns", "shift_rows", "scale_rows", "shift_bias", "scale_bias", "constants")

# PixelCNN++: the first layer's three convolutions; every gated resnet's two convolutions (windows
# (rows, columns, channels), out) and shortcut 1x1s, blocks in the order the network runs them (the up
# pass from the finest resolution, then the down pass from the coarsest; u_in_w (B, 12F, F), ul_in_w
# (B, 8F, F)); the downsampling convolutions; the upsampling transposed convolutions per kernel row
# (R - 1, 2, columns * F, F); the output 1x1; constants (pixel levels).
PIXELCNN_PP_WEIGHTS = (
    "u_init_w", "u_init_b", "ul_above_w", "ul_above_b", "ul_left_w", "ul_left_b",
    "u_in_w", "u_in_b", "u_out_w", "u_out_b", "u_short_w", "u_short_b",
    "ul_in_w", "ul_in_b", "ul_out_w", "ul_out_b", "ul_up_short_w", "ul_up_short_b",
    "ul_down_short_w", "ul_down_short_b",
    "u_down_w", "u_down_b", "ul_down_w", "ul_down_b", "u_up_w", "u_up_b", "ul_up_w", "ul_up_b", "out_w", "out_b",
    "constants",
)

# WaveNet: the input convolution's taps (2, R); per layer the dilated kernel over [oldest, newest] input
# (L, 2R, 2R), its bias, the class biases (L, classes, 2R) or empty, the residual and skip 1x1s side by
# side (L, R, R + S) and their biases; the output layers.
WAVENET_WEIGHTS = ("in_w", "in_b", "dilated_w", "dilated_b", "class_bias", "out_w", "out_b", "oh_w", "oh_b", "lg_w",
                   "lg_b")


@dataclass(frozen=True)
class FusedOp:
    """One family's operators under torch.ops.genserve."""

    refresh: str | None  # None where the program has no refresh graph
    refresh_inputs: tuple[str, ...]
    refresh_outputs: tuple[str, ...]
    step: str
    step_inputs: tuple[str, ...]  # "teacher" (forced pixels) is for tests; the engine leaves it None
    step_outputs: tuple[str, ...]  # "logits" comes back only when a teacher is given
    row: str | None  # refresh then step in one call, the states updated in place (every slot at a row start)
    row_inputs: tuple[str, ...]  # controls, then the list of states in the program's order
    rows: str  # CPU only: several row calls in one, the engine's per-row bookkeeping included (csrc/rows.h)
    weights: tuple[str, ...]
    # The runner steps a whole row per call, whatever span the graphs were exported with: WaveNet's step takes
    # any span (its graphs' is 4: a graph unrolled over a 320-sample frame would be enormous); PixelCNN++'s
    # takes whole rows only (it keeps the row so far within the call, where its graph recomputes it per pixel).
    row_span: bool = False


_GATED = FusedOp(
    refresh="gated_refresh",
    refresh_inputs=("pixels", "positions", "labels", "vertical", "condition"),
    refresh_outputs=("next_vertical", "next_links", "next_image_context", "next_hidden_context"),
    step="gated_step",
    step_inputs=("positions", "noise", "temperature", "links", "image_context", "hidden_context", "teacher"),
    step_outputs=("pixel", "next_image_context", "next_hidden_context", "logits"),
    row="gated_row",
    row_inputs=("pixels", "positions", "labels", "noise", "temperature"),
    rows="gated_rows",
    weights=GATED_WEIGHTS,
)

FUSED_OPS = {
    "gated_pixelcnn": _GATED,
    # The same operators, given the conditioning 1x1s and the map (the program's `condition` state).
    "conditioned_gated_pixelcnn": replace(_GATED, weights=CONDITIONED_GATED_WEIGHTS),
    "pixelcnn": FusedOp(
        refresh="pixelcnn_refresh",
        refresh_inputs=("image_rows", "block*"),
        refresh_outputs=("next_image_rows", "next_block*"),
        step="pixelcnn_step",
        step_inputs=("positions", "noise", "temperature", "image_rows", "block*", "teacher"),
        step_outputs=("pixel", "next_image_rows", "next_block*", "logits"),
        row="pixelcnn_row",
        row_inputs=("positions", "noise", "temperature"),
        rows="pixelcnn_rows",
        weights=PIXELCNN_WEIGHTS,
    ),
    "pixelcnn_pp": FusedOp(
        refresh="pixelcnn_pp_refresh",
        refresh_inputs=("pixels", "positions", "u_rows*"),
        refresh_outputs=("next_u_rows*", "next_u_values*"),
        step="pixelcnn_pp_step",
        step_inputs=("positions", "pixels", "noise", "temperature", "ul_rows*", "u_values*", "teacher"),
        step_outputs=("pixel", "next_ul_rows*", "logits"),
        row="pixelcnn_pp_row",
        row_inputs=("pixels", "positions", "noise", "temperature"),
        rows="pixelcnn_pp_rows",
        weights=PIXELCNN_PP_WEIGHTS,
        row_span=True,
    ),
    # A step per row call already: no refresh, and so no refresh-then-step row call.
    "maf": FusedOp(
        refresh=None,
        refresh_inputs=(),
        refresh_outputs=(),
        step="maf_step",
        step_inputs=("positions", "u", "hidden"),
        step_outputs=("pixel", "next_hidden"),
        row=None,
        row_inputs=(),
        rows="maf_rows",
        weights=MAF_WEIGHTS,
    ),
    "wavenet": FusedOp(
        refresh=None,
        refresh_inputs=(),
        refresh_outputs=(),
        step="wavenet_step",
        step_inputs=("noise", "temperature", "labels", "recent", "queue*"),
        step_outputs=("pixel", "next_recent", "next_queue*"),
        row=None,
        row_inputs=(),
        rows="wavenet_rows",
        weights=WAVENET_WEIGHTS,
        row_span=True,
    ),
}
