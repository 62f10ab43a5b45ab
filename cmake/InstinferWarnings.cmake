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
