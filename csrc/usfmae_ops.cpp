// Operator schemas of the usfmae library; implementations register per backend in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(usfmae, m) {
  // Keeps the num_keep patches of x [N, L, D] with the smallest noise [N, L] (ties: lower index).
  // Returns x_masked [N, num_keep, D], mask [N, L] (0 kept, 1 removed), ids_restore [N, L].
  m.def("random_masking(Tensor x, Tensor noise, int num_keep) -> (Tensor, Tensor, Tensor)");
  // grad_x [N, L, D] from grad_x_masked [N, K, D]: row l takes row ids_restore[l] when < K.
  m.def("random_masking_backward(Tensor grad_x_masked, Tensor ids_restore) -> Tensor");

  // fb/mae forward_loss of pred [N, L, p*p*C] against imgs [N, C, H, W] on the mask [N, L] == 1
  // patches, the target built on the fly (per-patch normalised, unbiased variance, eps 1e-6, when
  // norm_pix_loss). Returns the 0-dim loss (dtype: promotion of imgs, pred, mask) and, when
  // with_grad, d loss / d pred (pred's shape and dtype; an empty [0] tensor otherwise).
  m.def("mae_loss_fused(Tensor imgs, Tensor pred, Tensor mask, int patch_size, "
        "bool norm_pix_loss, bool with_grad) -> (Tensor, Tensor)");

  // softmax(q k^T * scale) v on q, k, v [B, H, N, d] (any strides, last one 1). Returns out
  // [B, H, N, d] (contiguous) and the fp32 row log-sum-exp [B, H, N] of the scaled scores.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // (dq, dk, dv) from grad_out and the forward's inputs, out and lse.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  // The same on the qkv projection qkv [B, N, 3, H, d]: out [B, N, H*d], lse [B, H, N].
  m.def("attention_packed_fwd(Tensor qkv, float scale) -> (Tensor, Tensor)");
  // grad_qkv [B, N, 3, H, d] from grad_out [B, N, H*d].
  m.def("attention_packed_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, float scale) "
        "-> Tensor");
}
