# Warnings and sanitizers, applied per target (never through global flags).
function(instinfer_set_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:C,CXX>:-Wall -Wextra -Wshadow -Wpedantic>
    $<$<COMPILE_LANGUAGE:CXX>:-Wnon-virtual-dtor>
    $<$<AND:$<COMPILE_LANGUAGE:C,CXX>,$<BOOL:${INSTINFER_WERROR}>>:-Werror>)
endfunction()

if(INSTINFER_SANITIZE)
  add_compile_options(-fsanitize=${INSTINFER_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${INSTINFER_SANITIZE})
endif()

# The SIMD instantiations of the one decode kernel template take 5-10 CPU-minutes each to compile
# with ASan or UBSan (their unrolled register tiles spill into instrumented stack slots), against
# under one without. Sanitizer builds compile them plain; the scalar instantiation of the same
# template, with the same index math over pages, stays instrumented and runs the same tests.
function(instinfer_unsanitized_kernel_sources)
  if(INSTINFER_SANITIZE)
    foreach(src ${ARGN})
      get_source_file_property(opts ${src} COMPILE_OPTIONS)
      if(NOT opts)
        set(opts "")
      endif()
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${opts};-fno-sanitize=all")
    endforeach()
  endif()
endfunction()
