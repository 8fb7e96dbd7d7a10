// Greedy generation with an slmc-built .pte on the ExecuTorch C++ runtime (from the Python
// wheel). The wheel ships the core runtime, kernels and delegates, not the LLM runner or
// tokenizer libraries, so this is a minimal loop over the program's `forward(tokens,
// input_pos) -> logits of the last position` (manifest.json "io"), on token ids:
//   generate MODEL.pte N_NEW ID [ID ...]   prints the N_NEW generated ids, one line.
// An XNNPACK .pte keeps a tied embedding/head table (float, or quantized codes both read) in
// MODEL.ptd beside it (manifest "data_file"): when that file exists it is loaded as the
// program's named data.
#include <executorch/extension/data_loader/file_data_loader.h>
#include <executorch/extension/flat_tensor/flat_tensor_data_map.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

using executorch::extension::FileDataLoader;
using executorch::extension::FlatTensorDataMap;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::Program;
using executorch::runtime::Span;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;

static int fail(const char* what, Error e) {
  std::fprintf(stderr, "generate: %s failed (error 0x%x)\n", what, static_cast<unsigned>(e));
  return 1;
}

// Run forward on `ids` starting at cache position `pos`; returns the argmax of the logits.
static Error step(Method& m, std::vector<int64_t>& ids, int64_t pos, int64_t* next) {
  TensorImpl::SizesType tok_sizes[2] = {1, static_cast<TensorImpl::SizesType>(ids.size())};
  TensorImpl::DimOrderType tok_order[2] = {0, 1};
  TensorImpl tok(ScalarType::Long, 2, tok_sizes, ids.data(), tok_order);
  TensorImpl::SizesType pos_sizes[1] = {1};
  TensorImpl::DimOrderType pos_order[1] = {0};
  TensorImpl posi(ScalarType::Long, 1, pos_sizes, &pos, pos_order);
  Error e = m.set_input(EValue(Tensor(&tok)), 0);
  if (e != Error::Ok) return e;
  if ((e = m.set_input(EValue(Tensor(&posi)), 1)) != Error::Ok) return e;
  if ((e = m.execute()) != Error::Ok) return e;
  const Tensor logits = m.get_output(0).toTensor();
  const float* l = logits.const_data_ptr<float>();
  int64_t n = logits.size(logits.dim() - 1), best = 0;
  for (int64_t i = 1; i < n; ++i) if (l[i] > l[best]) best = i;
  *next = best;
  return Error::Ok;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s MODEL.pte N_NEW ID [ID ...]\n", argv[0]);
    return 2;
  }
  executorch::runtime::runtime_init();
  auto loader = FileDataLoader::from(argv[1]);
  if (!loader.ok()) return fail("opening the .pte", loader.error());
  auto program = Program::load(&loader.get());
  if (!program.ok()) return fail("loading the program", program.error());
  auto meta = program->method_meta("forward");
  if (!meta.ok()) return fail("finding method forward", meta.error());

  // The planned buffers (activations, KV cache) the program asks for, and a pool for the rest.
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  std::vector<Span<uint8_t>> spans;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    size_t n = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
    buffers.emplace_back(new uint8_t[n]);
    spans.emplace_back(buffers.back().get(), n);
  }
  HierarchicalAllocator planned({spans.data(), spans.size()});
  static uint8_t pool[8 << 20];
  MemoryAllocator method_alloc(sizeof(pool), pool);
  MemoryManager memory(&method_alloc, &planned);
  // MODEL.ptd beside MODEL.pte: the external data (tied table) the program refers to by name
  std::string data_path(argv[1]);
  if (data_path.size() > 4 && data_path.compare(data_path.size() - 4, 4, ".pte") == 0) data_path.back() = 'd';
  std::optional<FileDataLoader> data_loader;
  std::optional<FlatTensorDataMap> data_map;
  std::FILE* probe = data_path != argv[1] ? std::fopen(data_path.c_str(), "rb") : nullptr;
  if (probe != nullptr) {
    std::fclose(probe);
    auto dl = FileDataLoader::from(data_path.c_str());
    if (!dl.ok()) return fail("opening the .ptd", dl.error());
    data_loader.emplace(std::move(dl.get()));
    auto dm = FlatTensorDataMap::load(&*data_loader);
    if (!dm.ok()) return fail("loading the .ptd", dm.error());
    data_map.emplace(std::move(dm.get()));
  }
  auto method = program->load_method("forward", &memory, nullptr, data_map ? &*data_map : nullptr);
  if (!method.ok()) return fail("loading method forward", method.error());

  int n_new = std::atoi(argv[2]);
  std::vector<int64_t> ids;
  for (int i = 3; i < argc; ++i) ids.push_back(std::atoll(argv[i]));
  int64_t pos = 0, next = 0;
  for (int t = 0; t < n_new; ++t) {
    Error e = step(*method, ids, pos, &next);
    if (e != Error::Ok) return fail("forward", e);
    pos += static_cast<int64_t>(ids.size());
    std::printf(t ? " %lld" : "%lld", static_cast<long long>(next));
    ids.assign(1, next);  // decode: one token at a time, the cache holds the rest
  }
  std::printf("\n");
  return 0;
}
