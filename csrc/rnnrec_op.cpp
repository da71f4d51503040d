// rnnrec_fast op registration for the CPU dispatch key.
//
// The op schemas are defined in Python (rnnrec_fast/ops.py); the library without Python
// (librnnrec_fast_ops.so, RNNREC_STANDALONE) defines the same two here. This file registers the C++
// CPU kernels of rnnrec_fast::recurrence and rnnrec_fast::recurrence_backward, so that a call from
// Python goes dispatcher -> C++ without entering the interpreter again (the serving step is a few
// microseconds of arithmetic, so per-call overhead matters). The checks and their messages mirror
// ops._check_inputs exactly (ValueError). A call that forces another backend ("numba",
// "reference", ...) on CPU tensors is handed to rnnrec_fast::recurrence_py, the same op with
// Python kernels.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <optional>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <tuple>

namespace rnnrec {

// Defined in rnnrec_cpu.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& resets, int64_t mode,
    bool reset_after);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& resets, const at::Tensor& y, const at::Tensor& ws, int64_t mode,
    bool reset_after, bool need_gx = true, bool need_gh0 = true, bool need_gw_ih = true, bool need_gw_hh = true);

// Defined in rnnrec_cpu.cpp: a ValueError for a tensor reaching past its storage.
void check_within_storage(const char* where, const char* name, const at::Tensor& t);

namespace {

using Opt = c10::optional<at::Tensor>;
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

thread_local std::string last_backend_name;
// Set by RecurrenceFn::backward around its call of the backward op: the gradients whose inputs
// require none (x, h0, W_ih, W_hh), which the C++ kernel then leaves out and the function drops
// (x's and each weight's product a sixth of a training step's; h0's the first step's carry, all of
// a one-step call's recurrent product, as in session-parallel training from a detached state).
// The op's schema and its other kernels are unchanged (they compute every gradient; a call from
// anywhere else, or a compiled graph's, gets them all), and the dispatcher still sees the call
// (profiler, dispatch modes: the FLOP formula asks backward_skips).
struct Skips {
  bool gx = false, gh0 = false, gw_ih = false, gw_hh = false;
};
thread_local Skips skips;

struct SkipGrads {
  Skips before;
  explicit SkipGrads(Skips now) : before(skips) { skips = now; }
  ~SkipGrads() { skips = before; }
};

#define RNNREC_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "rnnrec_fast.recurrence: ", __VA_ARGS__)

bool has(const Opt& t) { return t.has_value() && t->defined(); }

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (t.dim() == 1 || i + 1 < t.dim()) s += t.dim() == 1 ? "," : ", ";
  }
  return s + ")";
}

std::string dtype_str(at::ScalarType t) {  // as Python prints a torch.dtype (torch.float32, torch.int64)
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A str as Python's repr() writes it (ASCII escapes; other bytes as they are), as ops._check_inputs
// words the mode: a NUL inside the string cut the C++ message short there ("got 'gru"), and a
// newline or a quote came out raw where Python's message escapes it.
std::string py_repr(c10::string_view s) {
  const bool dq = s.find('\'') != c10::string_view::npos && s.find('"') == c10::string_view::npos;
  const char q = dq ? '"' : '\'';
  std::string r(1, q);
  for (const char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == q || c == '\\') {
      r += '\\';
      r += c;
    } else if (c == '\n') {
      r += "\\n";
    } else if (c == '\r') {
      r += "\\r";
    } else if (c == '\t') {
      r += "\\t";
    } else if (u < 0x20 || u == 0x7f) {
      const char* hex = "0123456789abcdef";
      r += "\\x";
      r += hex[u >> 4];
      r += hex[u & 15];
    } else {
      r += c;
    }
  }
  return r + q;
}

// Mirrors ops._check_memory: t's sizes, strides and offset stay within its storage (one freed or
// shrunk after the tensor was made would be read past its end).
void check_memory(const char* name, const at::Tensor& t) {
  check_within_storage("rnnrec_fast.recurrence: ", name, t);
}

// Mirrors ops.check_tensor_args: a None given for a tensor arrives as an undefined tensor, which
// the checks below would read as empty ("got torch.UNKNOWN_SCALAR (0,)") and at which torch's
// autograd stopped with "tensor does not have a device", naming nothing. Every kernel (the
// autograd ones first) calls it.
void check_given(std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  for (const auto& a : args)
    TORCH_CHECK_TYPE(a.second->defined(), "rnnrec_fast.recurrence: ", a.first, " must be a tensor, got None");
}
void check_given_fwd(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh) {
  check_given({{"x", &x}, {"w_ih", &w_ih}, {"w_hh", &w_hh}});
}
void check_given_bwd(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& y, const at::Tensor& ws) {
  check_given_fwd(x, w_ih, w_hh);
  check_given({{"grad_output", &grad_y}, {"grad_h_n", &grad_h_n}, {"output", &y}, {"workspace", &ws}});
}

// Mirrors ops._check_inputs; returns the mode index.
int64_t check_inputs(const at::Tensor& x, const Opt& h0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& lengths,
                     const Opt& resets, c10::string_view mode) {
  int64_t mode_i, gates;
  if (mode == "rnn_tanh") {
    mode_i = 0, gates = 1;
  } else if (mode == "rnn_relu") {
    mode_i = 1, gates = 1;
  } else if (mode == "gru") {
    mode_i = 2, gates = 3;
  } else {
    RNNREC_CHECK(false, "mode must be one of ('rnn_tanh', 'rnn_relu', 'gru'), got ", py_repr(mode));
  }
  RNNREC_CHECK(x.dim() == 3, "x must be 3-D (T, B, input_size), got shape ", shape_str(x));
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  RNNREC_CHECK(T != 0 && B != 0 && I != 0, "x must not be empty, got shape ", shape_str(x));
  RNNREC_CHECK(w_hh.dim() == 2 && w_hh.size(1) != 0 && w_hh.size(0) == gates * w_hh.size(1),
               "w_hh must be (", gates, "*H, H) for mode '", std::string(mode), "', got shape ",
               shape_str(w_hh));
  const int64_t H = w_hh.size(1);
  RNNREC_CHECK(w_ih.dim() == 2 && w_ih.size(0) == gates * H && w_ih.size(1) == I, "w_ih must be (",
               gates * H, ", ", I, ") (gates*H, input_size), got shape ", shape_str(w_ih));
  if (has(h0)) {
    RNNREC_CHECK(h0->dim() == 2 && h0->size(0) == B && h0->size(1) == H, "h0 must be (B, H) = (", B,
                 ", ", H, "), got shape ", shape_str(*h0));
  }
  RNNREC_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ",
               dtype_str(x.scalar_type()));
  auto same = [&](const at::Tensor& t, const char* name, bool bias) {
    if (bias) {
      RNNREC_CHECK(t.dim() == 1 && t.size(0) == gates * H, name, " must be (", gates * H,
                   ",), got shape ", shape_str(t));
    }
    RNNREC_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", dtype_str(t.scalar_type()),
                 " but x has ", dtype_str(x.scalar_type()), "; all must match");
    RNNREC_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
                 "; all must be on one device");
  };
  if (has(h0)) same(*h0, "h0", false);
  same(w_ih, "w_ih", false);
  same(w_hh, "w_hh", false);
  if (has(b_ih)) same(*b_ih, "b_ih", true);
  if (has(b_hh)) same(*b_hh, "b_hh", true);
  check_memory("x", x);
  if (has(h0)) check_memory("h0", *h0);
  check_memory("w_ih", w_ih);
  check_memory("w_hh", w_hh);
  if (has(b_ih)) check_memory("b_ih", *b_ih);
  if (has(b_hh)) check_memory("b_hh", *b_hh);
  if (has(lengths)) {
    const auto& L = *lengths;
    RNNREC_CHECK(L.scalar_type() == at::kLong && L.dim() == 1 && L.size(0) == B,
                 "lengths must be an int64 tensor of shape (", B, ",), got ", dtype_str(L.scalar_type()), " ",
                 shape_str(L));
    RNNREC_CHECK(L.device() == x.device(), "lengths is on ", L.device(), " but x is on ", x.device());
    check_memory("lengths", L);
    auto Lc = L.contiguous();
    const int64_t* p = Lc.data_ptr<int64_t>();
    int64_t lo = p[0], hi = p[0];
    for (int64_t b = 1; b < B; ++b) lo = std::min(lo, p[b]), hi = std::max(hi, p[b]);
    RNNREC_CHECK(lo >= 0 && hi <= T, "lengths must lie in [0, T=", T, "], got values in [", lo, ", ",
                 hi, "]");
  }
  if (has(resets)) {
    const auto& R = *resets;
    RNNREC_CHECK(R.scalar_type() == at::kBool && R.dim() == 2 && R.size(0) == T && R.size(1) == B,
                 "resets must be a bool tensor of shape (", T, ", ", B, "), got ", dtype_str(R.scalar_type()), " ",
                 shape_str(R));
    RNNREC_CHECK(R.device() == x.device(), "resets is on ", R.device(), " but x is on ", x.device());
    check_memory("resets", R);
  }
  return mode_i;
}


// Mirrors ops._check_backward_inputs (the C++ kernels go only float32 / float64: no half workspace).
void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& y,
                           const at::Tensor& ws, const at::Tensor& x, int64_t H, int64_t width) {
  const int64_t T = x.size(0), B = x.size(1);
  struct Arg {
    const char* name;
    const at::Tensor& t;
    std::vector<int64_t> shape;
  };
  const Arg args[] = {{"grad_output", grad_y, {T, B, H}},
                      {"grad_h_n", grad_h_n, {B, H}},
                      {"output", y, {T, B, H}},
                      {"workspace", ws, {T, B, width}}};
  for (const Arg& a : args) {
    RNNREC_CHECK(a.t.sizes() == at::IntArrayRef(a.shape) && a.t.scalar_type() == x.scalar_type(), a.name,
                 " must be a ", dtype_str(x.scalar_type()), " tensor of shape ",
                 shape_str(at::empty(a.shape, at::kMeta)), ", got ", dtype_str(a.t.scalar_type()), " ",
                 shape_str(a.t));
    RNNREC_CHECK(a.t.device() == x.device(), a.name, " is on ", a.t.device(), " but x is on ", x.device());
    check_memory(a.name, a.t);
  }
}

bool is_cpp(c10::string_view backend, const at::Tensor& x) {
  // "auto" and "cpp" mean the C++ kernels for float32/float64; other dtypes go to the Python layer,
  // which picks a backend that supports them, or explains why none does (for a forced "cpp", the
  // same ValueError as every other backend gives for a dtype it lacks).
  const bool cpp = (backend == "auto" || backend == "cpp") &&
                   (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
#if defined(RNNREC_STANDALONE)
  // no Python layer to hand the call to
  RNNREC_CHECK(cpp, "this library without Python (librnnrec_fast_ops) runs the 'cpp' backend on float32 "
               "and float64 CPU tensors only; got backend ", py_repr(backend), " with ",
               dtype_str(x.scalar_type()), " (the other backends and dtypes need the Python package)");
#endif
  return cpp;
}

Opt contig(const Opt& t) { return has(t) ? Opt(t->contiguous()) : Opt(); }

// The zero initial state when h0 is None.
at::Tensor state_or_zeros(const Opt& h0, const at::Tensor& x, const at::Tensor& w_hh) {
  return has(h0) ? h0->contiguous() : at::zeros({x.size(1), w_hh.size(1)}, x.options());
}

// A tensor's version counter, -1 for an inference tensor, which has none (torch.inference_mode's:
// reading it raised "Inference tensors do not track version counter" before torch's own clearer
// refusal to save one for backward).
int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

// A weight as the C++ kernels read it: a new TensorImpl on the same memory (storage, sizes, strides,
// offset). The op runs without the GIL (torch releases it around a call from Python), so another
// thread may meanwhile give a module's parameter other memory (`p.data = ...`, `p.set_(...)`,
// vector_to_parameters: a model updated while it serves), freeing the memory the kernel reads: a
// segfault. The snapshot keeps that memory alive to the end of the call, and its sizes are the ones
// checked. (The weights alone: ~0.15 us each; the other arguments are the caller's inputs or the
// op's own saved outputs.)
at::Tensor held(const at::Tensor& t) { return t.defined() ? t.variable_data() : t; }
Opt held(const Opt& t) { return has(t) ? Opt(t->variable_data()) : t; }

Fwd recurrence_cpu(const at::Tensor& x, const Opt& h0, const at::Tensor& w_ih_arg, const at::Tensor& w_hh_arg,
                   const Opt& b_ih_arg, const Opt& b_hh_arg, const Opt& lengths, const Opt& resets,
                   c10::string_view mode, bool reset_after, c10::string_view backend) {
  check_given_fwd(x, w_ih_arg, w_hh_arg);
  if (!is_cpp(backend, x)) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rnnrec_fast::recurrence_py", "")
                         .typed<Fwd(const at::Tensor&, const Opt&, const at::Tensor&,
                                    const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&,
                                    c10::string_view, bool, c10::string_view)>();
    return op.call(x, h0, w_ih_arg, w_hh_arg, b_ih_arg, b_hh_arg, lengths, resets, mode, reset_after, backend);
  }
  const at::Tensor w_ih = held(w_ih_arg), w_hh = held(w_hh_arg);
  const Opt b_ih = held(b_ih_arg), b_hh = held(b_hh_arg);
  const int64_t mode_i = check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode);
  last_backend_name = "cpp";
  return forward(x.contiguous(), state_or_zeros(h0, x, w_hh), w_ih.contiguous(), w_hh.contiguous(), contig(b_ih),
                 contig(b_hh), contig(lengths), contig(resets), mode_i, reset_after);
}

Bwd recurrence_backward_cpu(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
                            const Opt& h0, const at::Tensor& w_ih_arg, const at::Tensor& w_hh_arg,
                            const Opt& b_ih_arg, const Opt& b_hh_arg, const Opt& lengths, const Opt& resets,
                            const at::Tensor& y, const at::Tensor& ws, c10::string_view mode,
                            bool reset_after, c10::string_view backend) {
  check_given_bwd(grad_y, grad_h_n, x, w_ih_arg, w_hh_arg, y, ws);
  if (!is_cpp(backend, x)) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rnnrec_fast::recurrence_backward_py", "")
                         .typed<Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const Opt&, const at::Tensor&, const at::Tensor&, const Opt&,
                                    const Opt&, const Opt&, const Opt&, const at::Tensor&,
                                    const at::Tensor&, c10::string_view, bool, c10::string_view)>();
    return op.call(grad_y, grad_h_n, x, h0, w_ih_arg, w_hh_arg, b_ih_arg, b_hh_arg, lengths, resets, y, ws, mode,
                   reset_after, backend);
  }
  // (the weights as snapshots, as recurrence_cpu's: a weight saved for the backward may be given
  // other memory meanwhile too)
  const at::Tensor w_ih = held(w_ih_arg), w_hh = held(w_hh_arg);
  const Opt b_ih = held(b_ih_arg), b_hh = held(b_hh_arg);
  const int64_t mode_i = check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode);
  const int64_t H = w_hh.size(1);
  check_backward_inputs(grad_y, grad_h_n, y, ws, x, H, mode_i == 2 ? 4 * H : 0);
  // grad_y and x go as they are: the kernel reads strided views without a whole copy.
  return backward(grad_y, grad_h_n.contiguous(), x, state_or_zeros(h0, x, w_hh),
                  w_ih.contiguous(), w_hh.contiguous(), contig(b_ih), contig(b_hh), contig(lengths),
                  contig(resets), y.contiguous(), ws.contiguous(), mode_i, reset_after, !skips.gx, !skips.gh0,
                  !skips.gw_ih, !skips.gw_hh);
}

// ------------------------------------------------------------------------------------------------
// Autograd for CPU tensors, in C++: the same contract as ops._setup_context / ops._backward (which
// stay registered for every other device), without the Python autograd.Function around each call
// (~0.1 ms per forward and per backward at B32 T20 H100, measured: 7% of a training step).
// ------------------------------------------------------------------------------------------------
using Fwd11 = Fwd(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                  const Opt&, const Opt&, c10::string_view, bool, c10::string_view);
using Bwd15 = Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
                  const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, const at::Tensor&,
                  const at::Tensor&, c10::string_view, bool, c10::string_view);

at::Tensor or_undef(const Opt& t) { return has(t) ? *t : at::Tensor(); }
Opt as_opt(const at::Tensor& t) { return t.defined() ? Opt(t) : Opt(); }

struct RecurrenceFn : public torch::autograd::Function<RecurrenceFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const Opt& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                const Opt& b_ih, const Opt& b_hh, const Opt& lengths,
                                                const Opt& resets, c10::string_view mode, bool reset_after,
                                                c10::string_view backend, at::Tensor* ws_out) {
    // Below autograd, through the dispatcher: the CPU kernel, or a fake one under torch.compile.
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("rnnrec_fast::recurrence", "").typed<Fwd11>();
    at::Tensor y, h_n, ws;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, h_n, ws) = op.call(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend);
    }
    // Not the biases: the backward never reads them (see ops._setup_context)
    ctx->save_for_backward({x, or_undef(h0), w_ih, w_hh, or_undef(lengths), or_undef(resets), y, ws});
    ctx->saved_data["b_ih"] = has(b_ih);
    ctx->saved_data["b_hh"] = has(b_hh);
    // ... held, with their versions, for a backward with create_graph=True alone, which recomputes
    // the forward (see backward)
    if (has(b_ih)) {
      ctx->saved_data["b_ih_t"] = *b_ih;
      ctx->saved_data["b_ih_v"] = version_of(*b_ih);
    }
    if (has(b_hh)) {
      ctx->saved_data["b_hh_t"] = *b_hh;
      ctx->saved_data["b_hh_v"] = version_of(*b_hh);
    }
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["reset_after"] = reset_after;
    ctx->saved_data["backend"] = std::string(backend);
    // The workspace is saved state, not a result: it is handed back beside the function's outputs
    // (made below autograd, so no gradient flows into it and none is made for it) rather than
    // marked non-differentiable, which compiled autograd refuses for C++ functions (an internal
    // assert in CppNode::compiled_args). No zero gradient is made for an unused output / h_n.
    ctx->set_materialize_grads(false);
    *ws_out = ws;
    return {y, h_n};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("rnnrec_fast::recurrence_backward", "").typed<Bwd15>();
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &h0 = s[1], &w_ih = s[2], &w_hh = s[3], &y = s[6], &ws = s[7];
    at::Tensor gy = grads[0], gh = grads[1];
    if (!gy.defined()) gy = at::zeros_like(y);
    // (zeros like one step of y: its sizes may be symbolic, an unbacked batch under torch.compile,
    // which y.size() refuses)
    if (!gh.defined()) gh = at::zeros_like(y.select(0, 0), at::MemoryFormat::Contiguous);
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    // (needs_input_grad counts the inputs that are tensors: an absent h0 has no index)
    const bool need_gx = ctx->needs_input_grad(0), need_gh0 = h0.defined() && ctx->needs_input_grad(1);
    const size_t w = h0.defined() ? 2 : 1;
    const bool need_gwi = ctx->needs_input_grad(w), need_gwh = ctx->needs_input_grad(w + 1);
    const bool reset_after = ctx->saved_data["reset_after"].toBool();
    const at::Tensor none;
    at::Tensor gx, gh0, gwi, gwh, gbi, gbh;
    // create_graph=True: gradients that autograd records, to be differentiated again (a gradient
    // penalty, second-order methods): ops.py's rnnrec_fast::recurrence_backward_differentiable, the
    // forward recomputed in torch operations, with the biases as they were (checked). Not in the
    // library without Python (which does not define it): there the backward op runs, and its own
    // autograd refuses a second derivative (RecurrenceBackwardFn).
    static const auto diff =
        c10::Dispatcher::singleton().findSchema({"rnnrec_fast::recurrence_backward_differentiable", ""});
    if (at::GradMode::is_enabled() && diff.has_value()) {
      Opt b[2];
      const char* names[2] = {"b_ih", "b_hh"};
      for (int i = 0; i < 2; ++i) {
        const std::string key = names[i];
        if (!ctx->saved_data.count(key + "_t")) continue;
        b[i] = ctx->saved_data[key + "_t"].toTensor();
        const int64_t was = ctx->saved_data[key + "_v"].toInt(), now = version_of(*b[i]);
        TORCH_CHECK(was == now, "rnnrec_fast: ", key, " of a recurrence was modified by an inplace operation (version ",
                    was, " -> ", now, ") between its forward and a backward with create_graph=True, which "
                    "recomputes the forward with it; change it after the backward, or out of place");
      }
      using Diff12 = Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
                         const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, c10::string_view, bool);
      std::tie(gx, gh0, gwi, gwh, gbi, gbh) = diff->typed<Diff12>().call(
          gy, gh, x, as_opt(h0), w_ih, w_hh, b[0], b[1], as_opt(s[4]), as_opt(s[5]), mode, reset_after);
    } else {
      Skips skip;  // (the Python backends compute them all)
      if (is_cpp(backend, x)) skip = {!need_gx, !need_gh0, !need_gwi, !need_gwh};
      const SkipGrads guard(skip);
      std::tie(gx, gh0, gwi, gwh, gbi, gbh) = op.call(gy, gh, x, as_opt(h0), w_ih, w_hh, Opt(), Opt(), as_opt(s[4]),
                                                      as_opt(s[5]), y, ws, mode, reset_after, backend);
    }
    return {need_gx ? gx : none, need_gh0 ? gh0 : none, need_gwi ? gwi : none, need_gwh ? gwh : none,
            ctx->saved_data["b_ih"].toBool() ? gbi : none, ctx->saved_data["b_hh"].toBool() ? gbh : none,
            none, none, none, none, none, none};
  }
};

// The backward op's own autograd: it is not differentiable. RecurrenceFn's backward with
// create_graph=True does not call it (it calls recurrence_backward_differentiable); what records it
// is a direct call of the backward op with grad mode on, and torch.func's autograd function
// (ops._FuncRecurrenceBackward), whose second derivatives are not supported. Without this, such a
// call would be recorded through the fallback that warns and then treats it as constant, and a
// second derivative would silently miss the recurrence's part; with it, backpropagating through
// its outputs raises at once.
struct RecurrenceBackwardFn : public torch::autograd::Function<RecurrenceBackwardFn> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext*, const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
      const Opt& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh,
      const Opt& lengths, const Opt& resets, const at::Tensor& y, const at::Tensor& ws, c10::string_view mode,
      bool reset_after, c10::string_view backend) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("rnnrec_fast::recurrence_backward", "").typed<Bwd15>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gh0, gwi, gwh, gbi, gbh] = op.call(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets,
                                                 y, ws, mode, reset_after, backend);
    return {gx, gh0, gwi, gwh, gbi, gbh};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*, torch::autograd::variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
                                "rnnrec_fast: rnnrec_fast::recurrence_backward is not differentiable: second "
                                "derivatives through torch.func's transforms (jacrev(jacrev(f)), hessian), and in "
                                "the library without Python, are not supported; with the Python package an eager "
                                "backward with create_graph=True is (torch.autograd.grad)");
  }
};

Bwd recurrence_backward_autograd(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
                                 const Opt& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih,
                                 const Opt& b_hh, const Opt& lengths, const Opt& resets, const at::Tensor& y,
                                 const at::Tensor& ws, c10::string_view mode, bool reset_after,
                                 c10::string_view backend) {
  check_given_bwd(grad_y, grad_h_n, x, w_ih, w_hh, y, ws);
  auto o = RecurrenceBackwardFn::apply(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws,
                                       mode, reset_after, backend);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

Fwd recurrence_autograd_cpu(const at::Tensor& x, const Opt& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                            const Opt& b_ih, const Opt& b_hh, const Opt& lengths, const Opt& resets,
                            c10::string_view mode, bool reset_after, c10::string_view backend) {
  check_given_fwd(x, w_ih, w_hh);
  at::Tensor ws;
  auto out = RecurrenceFn::apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend, &ws);
  return {out[0], out[1], ws};
}

}  // namespace

void note_cpp_backend_ran() { last_backend_name = "cpp"; }
std::tuple<bool, bool, bool, bool> backward_skips() { return {skips.gx, skips.gh0, skips.gw_ih, skips.gw_hh}; }
std::string last_backend() { return last_backend_name; }
void set_last_backend(std::string name) { last_backend_name = std::move(name); }

}  // namespace rnnrec

namespace rnnrec {
namespace {

// The kernels' registrations (kept for the process's lifetime), made once at load time.
void register_kernels() {
  static torch::Library cpu(torch::Library::IMPL, "rnnrec_fast", c10::DispatchKey::CPU, __FILE__, __LINE__);
  static torch::Library autograd_cpu(torch::Library::IMPL, "rnnrec_fast", c10::DispatchKey::AutogradCPU, __FILE__,
                                     __LINE__);
  static torch::Library autograd(torch::Library::IMPL, "rnnrec_fast", c10::DispatchKey::Autograd, __FILE__, __LINE__);
  cpu.impl("recurrence", &recurrence_cpu);
  cpu.impl("recurrence_backward", &recurrence_backward_cpu);
  // For CPU tensors this takes precedence over the Autograd kernel that ops.py registers in Python
  // (which serves the other devices).
  autograd_cpu.impl("recurrence", &recurrence_autograd_cpu);
  // Every device: the backward op is not differentiable (ops.py registers the same in Python when
  // the extension is absent).
  autograd.impl("recurrence_backward", &recurrence_backward_autograd);
}

#if defined(RNNREC_STANDALONE)
Fwd cuda_refused(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                 const Opt&, const Opt&, c10::string_view, bool, c10::string_view) {
  RNNREC_CHECK(false, "this library without Python (librnnrec_fast_ops) runs on CPU tensors only; CUDA "
               "tensors need the Python package and its CUDA extension");
}

// The library without Python defines both schemas (as rnnrec_fast/ops.py does; tests/test_compile.py
// compares them) and registers the kernels at load time, unless the op is already there (the
// Python package imported in this process): TORCH_LIBRARY would then throw during the library's
// static initialisation and abort the process. Loaded first, it makes `import rnnrec_fast` fail
// with ops.py's clear error instead. The registrations live as long as the process.
struct StandaloneRegistration {
  StandaloneRegistration() {
    if (c10::Dispatcher::singleton().findSchema({"rnnrec_fast::recurrence", ""}).has_value()) return;
    static torch::Library def(torch::Library::DEF, "rnnrec_fast", std::nullopt, __FILE__, __LINE__);
    def.def(
        "recurrence(Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, "
        "Tensor? resets, str mode, bool reset_after, str backend) -> (Tensor output, Tensor h_n, Tensor workspace)");
    def.def(
        "recurrence_backward(Tensor grad_output, Tensor grad_h_n, Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, Tensor? lengths, Tensor? resets, Tensor output, Tensor workspace, str mode, "
        "bool reset_after, str backend) -> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, "
        "Tensor grad_b_ih, Tensor grad_b_hh)");
    register_kernels();
    // CUDA tensors in a libtorch program: a clear error rather than the dispatcher's "could not run"
    static torch::Library cuda(torch::Library::IMPL, "rnnrec_fast", c10::DispatchKey::CUDA, __FILE__, __LINE__);
    cuda.impl("recurrence", &cuda_refused);
  }
};
const StandaloneRegistration standalone_registration;
#else
// The Python package's extension: ops.py has defined the schemas before it imports _C.
struct PackageRegistration {
  PackageRegistration() { register_kernels(); }
};
const PackageRegistration package_registration;
#endif

}  // namespace
}  // namespace rnnrec
