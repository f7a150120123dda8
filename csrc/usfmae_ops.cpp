// Operator schemas of the usfmae library; implementations register per backend in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(usfmae, m) {
  // Keeps the num_keep patches of x [N, L, D] with the smallest noise [N, L] (ties: lower index).
  // Returns x_masked [N, num_keep, D], mask [N, L] (0 kept, 1 removed), ids_restore [N, L].
  m.def("random_masking(Tensor x, Tensor noise, int num_keep) -> (Tensor, Tensor, Tensor)");
  // grad_x [N, L, D] from grad_x_masked [N, K, D]: row l takes row ids_restore[l] when < K.
  m.def("random_masking_backward(Tensor grad_x_masked, Tensor ids_restore) -> Tensor");
}
