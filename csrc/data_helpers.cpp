// Index builders for the data pipeline (engine.data._helpers), bound with pybind11.
//
// Two loops that are sequential by nature and too slow in Python at corpus scale:
//
//   build_sample_idx(sizes, doc_idx, seq_length) -> [num_samples + 1, 2]
//       Walks the token stream sizes[doc_idx[0]], sizes[doc_idx[1]], ... and records where each
//       sample of seq_length + 1 tokens ends, as (position in doc_idx, token offset in that
//       document). Entry i is where sample i starts and entry i + 1 where it ends (inclusive):
//       consecutive samples share one token, so the label of a sample's last position is the
//       first input of the next. num_samples = (total_tokens - 1) / seq_length (partial tail dropped).
//
//   build_blending_indices(weights, size) -> (dataset_index, dataset_sample_index)
//       For each global sample i, choose the dataset d maximising weights[d] * max(i, 1) - taken[d]
//       (the one furthest below its share so far; ties go to the lowest index), record
//       (d, taken[d]) and increment taken[d].
//
// engine/data/samples.py holds the numpy implementation of both; the two must give identical arrays
// (tests/test_data.py checks it), so any change here needs the same change there.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

template <typename T>
bool has_dtype(const py::array& a) {
    return py::isinstance<py::array_t<T>>(a);
}

void check_vector(const py::array& a, const char* name) {
    if (a.ndim() != 1) {
        throw std::invalid_argument(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) +
                                    " dimensions");
    }
    if (!(a.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
    }
}

// Sum of the sizes of the documents in doc_idx, validating ids and sizes on the way.
template <typename SizeT, typename DocT>
int64_t total_tokens(const SizeT* sizes, int64_t num_sizes, const DocT* doc_idx, int64_t num_docs,
                     int64_t* max_size) {
    int64_t total = 0;
    *max_size = 0;
    for (int64_t i = 0; i < num_sizes; ++i) {
        if (sizes[i] < 0) {
            throw std::invalid_argument("sizes[" + std::to_string(i) + "] = " + std::to_string(sizes[i]) +
                                        " is negative");
        }
        if (static_cast<int64_t>(sizes[i]) > *max_size) *max_size = sizes[i];
    }
    for (int64_t i = 0; i < num_docs; ++i) {
        const int64_t d = doc_idx[i];
        if (d < 0 || d >= num_sizes) {
            throw std::invalid_argument("doc_idx[" + std::to_string(i) + "] = " + std::to_string(d) +
                                        " is outside [0, " + std::to_string(num_sizes) + ")");
        }
        total += sizes[d];
    }
    return total;
}

template <typename SizeT, typename DocT, typename OutT>
void fill_sample_idx(const SizeT* sizes, const DocT* doc_idx, int64_t num_docs, int64_t seq_length,
                     int64_t num_samples, OutT* out) {
    int64_t pos = 0;     // position in doc_idx of the current token's document
    int64_t offset = 0;  // the current token's offset inside that document
    out[0] = 0;
    out[1] = 0;
    for (int64_t s = 1; s <= num_samples; ++s) {
        // Tokens this sample still has to cover, counting the current one (shared with the previous sample).
        int64_t remaining = seq_length + 1;
        for (;;) {
            if (pos >= num_docs) {  // unreachable when num_samples comes from the token total
                throw std::logic_error("build_sample_idx ran past the end of doc_idx");
            }
            const int64_t available = static_cast<int64_t>(sizes[doc_idx[pos]]) - offset;
            if (available >= remaining) {
                offset += remaining - 1;
                break;
            }
            remaining -= available;  // empty documents have nothing available and are stepped over
            ++pos;
            offset = 0;
        }
        out[2 * s] = static_cast<OutT>(pos);
        out[2 * s + 1] = static_cast<OutT>(offset);
    }
}

template <typename SizeT, typename DocT>
py::array sample_idx_typed(const py::array& sizes_arr, const py::array& doc_arr, int64_t seq_length) {
    const SizeT* sizes = static_cast<const SizeT*>(sizes_arr.data());
    const DocT* doc_idx = static_cast<const DocT*>(doc_arr.data());
    const int64_t num_sizes = sizes_arr.shape(0);
    const int64_t num_docs = doc_arr.shape(0);
    int64_t max_size = 0;
    int64_t total = 0;
    {
        py::gil_scoped_release release;
        total = total_tokens(sizes, num_sizes, doc_idx, num_docs, &max_size);
    }
    const int64_t num_samples = total > 0 ? (total - 1) / seq_length : 0;
    // int32 output whenever doc_idx positions and in-document offsets fit (the Python side uses the same rule).
    const bool wide = num_docs > kInt32Max || max_size > kInt32Max;
    const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(num_samples + 1), 2};
    if (wide) {
        py::array_t<int64_t> out(shape);
        int64_t* p = out.mutable_data();
        py::gil_scoped_release release;
        fill_sample_idx(sizes, doc_idx, num_docs, seq_length, num_samples, p);
        return std::move(out);
    }
    py::array_t<int32_t> out(shape);
    int32_t* p = out.mutable_data();
    py::gil_scoped_release release;
    fill_sample_idx(sizes, doc_idx, num_docs, seq_length, num_samples, p);
    return std::move(out);
}

template <typename SizeT>
py::array sample_idx_sizes(const py::array& sizes, const py::array& doc_idx, int64_t seq_length) {
    if (has_dtype<int32_t>(doc_idx)) return sample_idx_typed<SizeT, int32_t>(sizes, doc_idx, seq_length);
    if (has_dtype<int64_t>(doc_idx)) return sample_idx_typed<SizeT, int64_t>(sizes, doc_idx, seq_length);
    throw std::invalid_argument("doc_idx must be int32 or int64, got dtype " +
                                py::str(doc_idx.dtype()).cast<std::string>());
}

py::array build_sample_idx(const py::array& sizes, const py::array& doc_idx, int64_t seq_length) {
    check_vector(sizes, "sizes");
    check_vector(doc_idx, "doc_idx");
    if (seq_length <= 0) {
        throw std::invalid_argument("seq_length must be positive, got " + std::to_string(seq_length));
    }
    if (has_dtype<int32_t>(sizes)) return sample_idx_sizes<int32_t>(sizes, doc_idx, seq_length);
    if (has_dtype<int64_t>(sizes)) return sample_idx_sizes<int64_t>(sizes, doc_idx, seq_length);
    throw std::invalid_argument("sizes must be int32 or int64, got dtype " +
                                py::str(sizes.dtype()).cast<std::string>());
}

template <typename IndexT>
void fill_blending(const double* weights, int64_t num_datasets, int64_t size, IndexT* dataset_index,
                   int64_t* dataset_sample_index) {
    std::vector<int64_t> taken(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
        const double scale = i > 0 ? static_cast<double>(i) : 1.0;
        int64_t best = 0;
        double best_error = 0.0;
        for (int64_t d = 0; d < num_datasets; ++d) {
            // volatile: round the product to double before subtracting, never a fused multiply-add,
            // so the result matches numpy/Python bit for bit on every target.
            volatile double target = weights[d] * scale;
            const double error = target - static_cast<double>(taken[d]);
            if (d == 0 || error > best_error) {
                best = d;
                best_error = error;
            }
        }
        dataset_index[i] = static_cast<IndexT>(best);
        dataset_sample_index[i] = taken[best];
        ++taken[best];
    }
}

py::tuple build_blending_indices(const py::array& weights_arr, int64_t size) {
    check_vector(weights_arr, "weights");
    if (!has_dtype<double>(weights_arr)) {
        throw std::invalid_argument("weights must be float64, got dtype " +
                                    py::str(weights_arr.dtype()).cast<std::string>());
    }
    const int64_t num_datasets = weights_arr.shape(0);
    if (num_datasets == 0) throw std::invalid_argument("weights is empty: blending needs at least one dataset");
    if (size < 0) throw std::invalid_argument("size must be >= 0, got " + std::to_string(size));
    const double* weights = static_cast<const double*>(weights_arr.data());
    py::array_t<int64_t> sample_index(static_cast<py::ssize_t>(size));
    int64_t* sample_ptr = sample_index.mutable_data();
    // uint8 for up to 256 datasets (the usual case, 1 byte per sample), int32 beyond.
    if (num_datasets <= 256) {
        py::array_t<uint8_t> dataset_index(static_cast<py::ssize_t>(size));
        uint8_t* index_ptr = dataset_index.mutable_data();
        {
            py::gil_scoped_release release;
            fill_blending(weights, num_datasets, size, index_ptr, sample_ptr);
        }
        return py::make_tuple(dataset_index, sample_index);
    }
    py::array_t<int32_t> dataset_index(static_cast<py::ssize_t>(size));
    int32_t* index_ptr = dataset_index.mutable_data();
    {
        py::gil_scoped_release release;
        fill_blending(weights, num_datasets, size, index_ptr, sample_ptr);
    }
    return py::make_tuple(dataset_index, sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "C++ index builders for engine.data.samples (sample index, blending indices)";
    m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
          "[num_samples + 1, 2] (doc_idx position, offset) of each sample boundary; int32, or int64 when needed.");
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
          "(dataset_index uint8|int32 [size], dataset_sample_index int64 [size]) by the greedy weight rule.");
}
